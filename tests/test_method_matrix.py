"""The adapter x stage matrix: every peft_method under every training stage trains one step on a tiny
model (slow tier: about 60 one-step runs), or is refused at parse time with one line naming the method
and the stage (README "Adapter methods x stages"; the refusals live in stages/core/support.py)."""
import importlib
import json
from pathlib import Path

import pytest

from stages.core.support import REFUSED
from synthetic import preference_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["full", "lora", "dora", "qlora", "prefix", "prompt", "ia3", "adapters"]
STAGES = ["sft", "rm", "dpo", "kto", "orpo", "ppo", "grpo", "rloo"]
# what the README's matrix says; written out here (not read from REFUSED) so the two are checked against each other
EXPECTED_REFUSALS = {("rm", "prefix"), ("orpo", "prompt"), ("ppo", "prefix"), ("ppo", "prompt"), ("ppo", "adapters")}
ONE_STEP = ["--max_steps", "1", "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none", "--validation_fraction", "0",
            "--lora_r", "4", "--num_virtual_tokens", "4", "--adapter_size", "8"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama 64 wide (bitsandbytes' CPU 4-bit kernels need rows of at least one 64-wide block) and data."""
    from tiny_models import save_tiny

    d = tmp_path_factory.mktemp("matrix")
    model = save_tiny(d / "tiny64", "llama", hidden=64)
    rows = preference_rows(16, seed=0)
    pairs = write_jsonl(d / "pairs.jsonl", rows)
    sft_rows = write_jsonl(d / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
    online = ["--reward", '{"regex": "e"}', "--eval_datasets", "[]", "--max_train_rows", "8"]
    data = {"sft": ["--datasets", sft_rows, "--eval_datasets", "[]"],
            **{s: ["--datasets", pairs, "--eval_datasets", "[]"] for s in ("rm", "dpo", "kto", "orpo")},
            "ppo": online + ["--rollout_batch_size", "8", "--num_ppo_epochs", "1"], "grpo": online, "rloo": online}
    return model, data


def _argv(setup, stage, method, out):
    model, data = setup
    recipe = ROOT / "recipes/tiny" / f"{'grpo' if stage == 'rloo' else stage}.yaml"
    return ["--config", str(recipe), "--model_name_or_path", str(model), "--output_dir", str(out),
            "--peft_method", method, *ONE_STEP, *data[stage]]


def test_the_refusal_table_is_the_documented_one():
    assert set(REFUSED) == EXPECTED_REFUSALS


COMBINATIONS = [(stage, method) for stage in STAGES for method in METHODS]


@pytest.mark.parametrize("stage, method", sorted(EXPECTED_REFUSALS))
def test_a_refused_combination_stops_before_loading_weights(stage, method, setup, tmp_path, capsys, monkeypatch):
    from stages.core import policy

    monkeypatch.setattr(policy, "load_model", lambda *a, **k: pytest.fail("loaded weights before refusing"))
    out = tmp_path / "out"
    code = importlib.import_module(f"stages.{stage}").cli(_argv(setup, stage, method, out))
    err = capsys.readouterr().err
    assert code == 2 and f"peft_method: {method} is not supported by the {stage} stage" in err, err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage, method", [c for c in COMBINATIONS if c not in EXPECTED_REFUSALS])
def test_each_other_combination_trains_one_step(stage, method, setup, tmp_path):
    out = tmp_path / "out"
    importlib.import_module(f"stages.{stage}").main(_argv(setup, stage, method, out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["stage"] == stage
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    assert any(h.get("step") == 1 for h in history), history
    weights = "model*.safetensors" if method == "full" else "adapter_model.safetensors"
    assert any(out.glob(weights)), sorted(p.name for p in out.iterdir())


def test_a_starting_adapter_of_a_refused_method_is_refused_too(setup, tmp_path, capsys):
    """An SFT prefix-tuning output is trained further as prefix tuning, so PPO refuses it before loading."""
    model, _ = setup
    sft_out = tmp_path / "sft-prefix"
    sft_out.mkdir()
    (sft_out / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING",
                                                            "base_model_name_or_path": str(model)}))
    argv = _argv(setup, "ppo", "full", tmp_path / "out")
    argv[argv.index("--model_name_or_path") + 1] = str(sft_out)
    code = importlib.import_module("stages.ppo").cli(argv)
    err = capsys.readouterr().err
    assert code == 2 and "holds a prefix adapter" in err and "not supported by the ppo stage" in err, err
