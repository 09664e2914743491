"""DPO (and its loss family), KTO and ORPO stages on tiny models."""
import json
from pathlib import Path

import pytest
import torch

from stages import dpo, kto, orpo, sft
from synthetic import preference_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY_DPO = str(ROOT / "recipes/tiny/dpo.yaml")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return write_jsonl(d / "train.jsonl", preference_rows(64, seed=0)), write_jsonl(d / "held.jsonl", preference_rows(24, seed=1))


@pytest.fixture(scope="module")
def sft_lora(tiny_llama, pairs, tmp_path_factory):
    """An SFT LoRA output trained on the chosen replies."""
    d = tmp_path_factory.mktemp("sftdata")
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in preference_rows(32, seed=5)]
    data = write_jsonl(d / "sft.jsonl", rows)
    out = d / "sft"
    sft.main(["--config", str(ROOT / "recipes/tiny/sft.yaml"), "--model_name_or_path", str(tiny_llama),
              "--output_dir", str(out), "--datasets", data, "--eval_datasets", "[]", "--validation_fraction", "0.2"])
    return out


def run(stage_mod, model, out, data, evals, *extra, config=TINY_DPO):
    return stage_mod.main(["--config", config, "--model_name_or_path", str(model), "--output_dir", str(out),
                           "--datasets", data, "--eval_datasets", evals, *extra])


def manifest(out):
    return json.loads((Path(out) / "manifest.json").read_text())


@pytest.fixture
def precomputed(monkeypatch):
    """The dataset names TRL precomputed reference log-probs for during the test (the call is spied on)."""
    from trl import DPOTrainer

    names, original = [], DPOTrainer._precompute_ref_logps

    def spy(self, dataset, name, batch_size):
        names.append(name)
        return original(self, dataset, name, batch_size)

    monkeypatch.setattr(DPOTrainer, "_precompute_ref_logps", spy)
    return names


def test_dpo_on_sft_lora_uses_the_sft_policy_as_reference_and_learns(sft_lora, tiny_llama, pairs, tmp_path, precomputed):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from stages.core.policy import load_model

    out = tmp_path / "dpo"
    run(dpo, sft_lora, out, *pairs)
    m = manifest(out)
    assert precomputed == ["train", "eval"]  # on by default here (two epochs, a validation set)
    start, final = m["metrics"]["start"], m["metrics"]["final"]
    # At the start the policy IS the (precomputed) reference: every implicit reward is zero (up to float
    # rounding: the reference log-probs were precomputed in batches of another size)
    assert abs(start["start_rewards/chosen"]) < 1e-5 and abs(start["start_rewards/rejected"]) < 1e-5
    assert final["eval_rewards/accuracies"] >= 0.7 and final["eval_rewards/margins"] > 0
    # Adapters off on the DPO output == the SFT policy (merged), not the raw base.
    sft_model, _, _ = load_model(str(sft_lora))
    policy = PeftModel.from_pretrained(load_model(str(sft_lora))[0], out).eval()
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    with torch.no_grad(), policy.disable_adapter():
        ref_logits = policy(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(ref_logits, sft_model.eval()(input_ids=ids).logits)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()(input_ids=ids).logits
    assert not torch.allclose(ref_logits, base, atol=1e-4)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(sft_lora.resolve())


# The first step's loss at zero margin (a fresh LoRA: policy == reference, so every log-ratio is 0), beta 0.1,
# by hand: sigmoid -log sigmoid(0) = ln 2; IPO (0 - 1/(2 beta))^2 = 25; hinge relu(1 - 0) = 1; robust
# (-(1-e) log sigmoid(0) + e log sigmoid(0)) / (1-2e) = ln 2 for any e; sigmoid + SFT adds the chosen
# replies' NLL, several nats on a random 400-token model.
@pytest.mark.parametrize("loss, low, high", [("ipo", 24.99, 25.01), ("hinge", 0.999, 1.001), ("robust", 0.6926, 0.6937),
                                             ("sigmoid,sft", 0.6931 + 3, 0.6931 + 8)])
def test_every_loss_type_trains_with_its_own_loss(loss, low, high, tiny_llama, pairs, tmp_path):
    extra = ["--loss_type", *loss.split(","), "--max_steps", "2", "--logging_steps", "1", "--eval_strategy", "no",
             "--save_strategy", "no"]
    if loss == "robust":
        extra += ["--label_smoothing", "0.1"]
    run(dpo, tiny_llama, tmp_path / "dpo", pairs[0], pairs[1], *extra)
    losses = [h["loss"] for h in json.loads((tmp_path / "dpo" / "metrics.json").read_text())["log_history"] if "loss" in h]
    assert len(losses) == 2 and low <= losses[0] <= high, losses
    assert losses[1] == losses[1]  # no NaN after the first update


def test_precomputed_reference_log_probs(tiny_llama, pairs, tmp_path, precomputed):
    run(dpo, tiny_llama, tmp_path / "dpo", *pairs, "--precompute_ref_log_probs", "true", "--max_steps", "3")
    m = manifest(tmp_path / "dpo")
    assert precomputed == ["train", "eval"]
    start = m["metrics"]["start"]  # precomputed reference = the untrained policy: zero implicit rewards
    assert abs(start["start_rewards/chosen"]) < 1e-3 and abs(start["start_rewards/rejected"]) < 1e-3


def test_precompute_defaults_on_only_where_the_reference_would_score_rows_twice(tiny_llama, pairs, tmp_path, monkeypatch,
                                                                              precomputed):
    from types import SimpleNamespace as NS

    from stages.core.preference import precompute_pays_off

    one_epoch = NS(max_steps=-1, num_train_epochs=1, sync_ref_model=False)
    assert precompute_pays_off(one_epoch, has_validation=True)  # start + final evaluation at least
    assert not precompute_pays_off(one_epoch, has_validation=False)
    assert precompute_pays_off(NS(max_steps=-1, num_train_epochs=3, sync_ref_model=False), has_validation=False)
    assert not precompute_pays_off(NS(max_steps=-1, num_train_epochs=3, sync_ref_model=True), has_validation=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not precompute_pays_off(one_epoch, has_validation=True)  # TRL's precompute cache is per process
    monkeypatch.delenv("WORLD_SIZE")
    run(dpo, tiny_llama, tmp_path / "off", *pairs, "--precompute_ref_log_probs", "false", "--max_steps", "2")
    assert precomputed == []  # the recipe wins over the default (validation set present: default on)


def test_kto_runs_on_unpaired_data(tiny_llama, tmp_path):
    rows = []
    for r in preference_rows(32, seed=0):
        rows.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        rows.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    run(kto, tiny_llama, tmp_path / "kto", data, "[]", "--max_steps", "3", "--validation_fraction", "0.2",
        config=str(ROOT / "recipes/tiny/kto.yaml"))
    m = manifest(tmp_path / "kto")
    assert m["stage"] == "kto" and m["data"]["task"] == "unpaired"


def test_orpo_runs_reference_free(tiny_qwen2, pairs, tmp_path, monkeypatch):
    """Full fine-tuning, where DPO and KTO build a frozen reference copy: ORPO builds none and trains on its
    own odds-ratio loss."""
    from stages.core import policy

    monkeypatch.setattr(policy, "frozen_reference", lambda model: pytest.fail("ORPO built a reference model"))
    run(orpo, tiny_qwen2, tmp_path / "orpo", *pairs, "--max_steps", "3", "--peft_method", "full",
        config=str(ROOT / "recipes/tiny/orpo.yaml"))
    history = json.loads((tmp_path / "orpo" / "metrics.json").read_text())["log_history"]
    assert any("log_odds_ratio" in h for h in history) and manifest(tmp_path / "orpo")["status"] == "complete"


@pytest.mark.slow
def test_kto_learns_the_toy_preference_beyond_its_seed_spread(tiny_llama, pairs, tmp_path):
    """Toy task (tests/synthetic.py): desirable = a polite reply, undesirable = a rude one, built from the
    pairs (split by prompt). Held-out metric: KTO's implicit-reward margin (desirable minus undesirable) on
    the 24 held-out prompts, 0 at the start by construction. Measured once over seeds 0-2 (the tiny recipe,
    2 epochs): 0.716 / 0.821 / 0.828, a seed-to-seed spread of 0.11; the margin must exceed 0.5."""
    out = tmp_path / "kto"
    run(kto, tiny_llama, out, *pairs, "--save_strategy", "no", config=str(ROOT / "recipes/tiny/kto.yaml"))
    metrics = manifest(out)["metrics"]
    assert metrics["start"]["start_rewards/margins"] == pytest.approx(0, abs=1e-4)
    assert metrics["final"]["eval_rewards/margins"] > 0.5, metrics["final"]


@pytest.mark.slow
def test_orpo_learns_the_toy_preference_beyond_its_seed_spread(tiny_qwen2, pairs, tmp_path):
    """Toy task: the polite reply over the rude one (tests/synthetic.py). Held-out metric: ORPO's mean log
    odds ratio of the chosen over the rejected reply on the 24 held-out pairs. Measured once over seeds 0-2
    (learning rate 2e-2, 3 epochs): 0.021 / 0.019 / 0.019 -> 0.302 / 0.262 / 0.301, gains 0.243-0.282, a
    seed-to-seed spread of 0.04; the gain must exceed 0.15."""
    out = tmp_path / "orpo"
    run(orpo, tiny_qwen2, out, *pairs, "--learning_rate", "2e-2", "--num_train_epochs", "3", "--save_strategy", "no",
        config=str(ROOT / "recipes/tiny/orpo.yaml"))
    metrics = manifest(out)["metrics"]
    gain = metrics["final"]["eval_log_odds_chosen"] - metrics["start"]["start_log_odds_chosen"]
    assert gain > 0.15, (metrics["start"], metrics["final"])
