"""GRPO and RLOO stages (TRL's trainers) on a tiny model with the suite's reward plumbing."""
import json
from pathlib import Path

from stages import grpo, rloo, rm
from synthetic import preference_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes/tiny/grpo.yaml")
RULES = '[{"verifier": "test_grpo_stage:share_of_e", "weight": 2.0}, {"regex": "e", "weight": 0.5}]'


def share_of_e(prompt, response):
    return response.count("e") / max(1, len(response))


def test_grpo_runs_a_few_steps_with_weighted_rules_and_writes_a_complete_artifact(tiny_llama, tmp_path):
    out = tmp_path / "grpo"
    grpo.main(["--config", TINY, "--model_name_or_path", str(tiny_llama), "--output_dir", str(out), "--reward", RULES])
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["stage"] == "grpo" and m["fingerprint"]
    assert m["reward"]["reward_weights"] == [2.0, 0.5]
    assert m["metrics"]["start"]["n_prompts"] == 8 and "mean_reward" in m["metrics"]["final"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "metrics.json", "README.md"):
        assert (out / name).is_file(), name
    assert not (out / "training_args.bin").exists()
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    steps = [h for h in history if "rewards/verifier/mean" in h]
    assert len(steps) == 3 and all("rewards/regex/mean" in h for h in steps)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_llama.resolve())
    # same command again: complete with the same config, nothing to do
    assert grpo.main(["--config", TINY, "--model_name_or_path", str(tiny_llama), "--output_dir", str(out),
                      "--reward", RULES]) == out


def test_rloo_with_a_reward_model_plus_a_rule(tiny_llama, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", preference_rows(32, seed=0))
    held = write_jsonl(tmp_path / "held.jsonl", preference_rows(8, seed=1))
    rm.main(["--config", str(ROOT / "recipes/tiny/rm.yaml"), "--model_name_or_path", str(tiny_llama), "--datasets", train,
             "--eval_datasets", held, "--num_train_epochs", "1", "--output_dir", str(tmp_path / "rm")])
    out = tmp_path / "rloo"
    rloo.main(["--config", TINY, "--model_name_or_path", str(tiny_llama), "--output_dir", str(out), "--max_steps", "2",
               "--reward_model", str(tmp_path / "rm"), "--reward_model_weight", "0.5", "--reward", '{"regex": "e"}'])
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["stage"] == "rloo" and m["reward"]["reward_weights"] == [0.5, 1.0]
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    assert any("rewards/reward_model/mean" in h for h in history)


def test_reward_weights_must_match_the_reward_functions(tiny_llama, tmp_path, capsys):
    code = grpo.cli(["--config", TINY, "--model_name_or_path", str(tiny_llama), "--output_dir", str(tmp_path / "g"),
                     "--reward", RULES, "--reward_weights", "1.0"])
    assert code == 2 and "reward_weights" in capsys.readouterr().err


def test_grpo_passes_the_shared_vllm_keys_to_trl_and_says_clearly_when_vllm_is_missing(tiny_llama, tmp_path, capsys):
    from stages.core.ppo.online import GRPOStageConfig
    from stages.core.stage import parse_stage

    args = parse_stage(GRPOStageConfig, ["--config", TINY, "--model_name_or_path", str(tiny_llama), "--output_dir",
                                         str(tmp_path / "g"), "--reward", RULES, "--use_vllm", "true", "--vllm_mode",
                                         "server", "--vllm_server_timeout", "30", "--loss_type", "dr_grpo"], stage="grpo")
    t = args.training
    assert (t.use_vllm, t.vllm_mode, t.vllm_server_timeout, t.loss_type) == (True, "server", 30.0, "dr_grpo")
    import importlib.util

    assert importlib.util.find_spec("vllm") is None  # the suite's environment has no vLLM (see the README)
    code = grpo.cli(["--config", TINY, "--model_name_or_path", str(tiny_llama), "--output_dir", str(tmp_path / "g"),
                     "--reward", RULES, "--use_vllm", "true"])
    assert code == 2 and "use_vllm: TRL's vLLM generation" in capsys.readouterr().err
