"""CPO and SimPO (trl.experimental CPOTrainer) as a suite stage: reference-free, learns the toy preference."""
import json
from pathlib import Path

import pytest

from stages import cpo
from synthetic import preference_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes/tiny/cpo.yaml")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cpo-pairs")
    return write_jsonl(d / "train.jsonl", preference_rows(64, seed=0)), write_jsonl(d / "held.jsonl", preference_rows(24, seed=1))


def _lora_b_norm(out: Path) -> float:
    from safetensors.torch import load_file

    weights = load_file(str(out / "adapter_model.safetensors"))
    return sum(float(t.abs().sum()) for k, t in weights.items() if "lora_B" in k)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["sigmoid", "simpo"])
def test_cpo_and_simpo_learn_the_toy_preference_without_a_reference(tiny_qwen2, pairs, tmp_path, loss):
    out = tmp_path / loss
    extra = ["--loss_type", loss] + (["--cpo_alpha", "0.0", "--beta", "2.0"] if loss == "simpo" else [])
    cpo.main(["--config", TINY, "--model_name_or_path", str(tiny_qwen2), "--output_dir", str(out),
              "--datasets", pairs[0], "--eval_datasets", pairs[1], *extra])
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["stage"] == "cpo"
    assert m["metrics"]["reference"].startswith("none")
    assert m["config"]["training"]["loss_type"] == loss
    start, final = m["metrics"]["start"], m["metrics"]["final"]
    # the held-out preference is being learnt in 16 steps: the chosen-minus-rejected margin rises clearly
    # (seen: sigmoid -3.8 -> -0.8, simpo 0.04 -> 0.54) and accuracy does not fall
    assert final["eval_rewards/margins"] - start["start_rewards/margins"] > 0.25
    assert final["eval_rewards/accuracies"] >= start["start_rewards/accuracies"]
    assert _lora_b_norm(out) > 0  # LoRA B starts at zero: a trained adapter has moved it
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    assert any("rewards/accuracies" in h for h in history if "eval_loss" not in h)
