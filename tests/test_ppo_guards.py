"""Guards against reward over-optimization: a toy task whose proxy reward can be gamed, the gold-based
checkpoint selection and early stop, the reward shaping guards, and the evaluate stage's flag.

The toy task: the proxy "reward model" rewards the share of the letter 'x' in a response (a spurious
feature), the gold judge rewards varied responses (distinct characters / characters). Maximising the
proxy makes the tiny policy repeat 'x': the proxy rises, the gold score falls.
"""
import json
from pathlib import Path

import pytest
import torch

from stages import ppo

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes/tiny/ppo.yaml")
PROXY = '{"verifier": "test_ppo_guards:share_of_x"}'
GOLD = '{"verifier": "test_ppo_guards:variety"}'
LORA_WITH_HEAD = ["--lora_target_modules", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                  "lm_head"]


def share_of_x(prompt, response):
    """The gameable proxy: the share of the letter 'x' among the response's characters."""
    return response.count("x") / max(1, len(response))


def variety(prompt, response):
    """The gold judge: distinct characters per character (1 for no repetition, 1/n for one character n times)."""
    return len(set(response)) / max(1, len(response))


def run_toy(model, out, *extra):
    ppo.main(["--config", TINY, "--model_name_or_path", str(model), "--output_dir", str(out), "--reward", PROXY,
              "--gold_judge", GOLD, "--gold_eval_steps", "2", "--max_steps", "20", "--num_ppo_epochs", "4",
              "--lr_scheduler_type", "constant", "--kl_coef", "0.02", "--learning_rate", "3e-2", "--save_strategy", "no",
              *LORA_WITH_HEAD, *extra])
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    history = json.loads((Path(out) / "metrics.json").read_text())["log_history"]
    return manifest, [h for h in history if "gold_score" in h]


def test_without_guards_the_gold_score_falls_while_the_proxy_rises(tiny_llama, tmp_path):
    manifest, evals = run_toy(tiny_llama, tmp_path / "unguarded", "--gold_select_best", "false", "--gold_patience", "0")
    assert [e["step"] for e in evals] == list(range(0, 21, 2))  # the start, then every 2 updates
    for e in evals:
        assert {"heldout_reward", "gold_score", "kl_to_reference", "response_length"} <= set(e)
    first, last = evals[0], evals[-1]
    assert last["heldout_reward"] > first["heldout_reward"] + 0.3, evals  # the proxy is gamed...
    assert last["gold_score"] < first["gold_score"] - 0.3, evals  # ...at the gold judge's expense
    assert last["kl_to_reference"] > 0.5
    guards = manifest["metrics"]["guards"]
    assert guards["selected_update"] is None and guards["last_update"] == 20 and guards["stopped_early"] is None
    assert manifest["metrics"]["final"]["gold_score"] == pytest.approx(last["gold_score"], abs=1e-6)


def test_gold_selection_keeps_the_best_policy_and_stops_when_gold_falls_while_reward_rises(tiny_llama, tmp_path):
    manifest, evals = run_toy(tiny_llama, tmp_path / "guarded", "--gold_patience", "2")
    guards, metrics = manifest["metrics"]["guards"], manifest["metrics"]
    assert guards["stopped_early"] and "gold score below its best" in guards["stopped_early"]
    assert guards["last_update"] < 20 and evals[-1]["step"] == guards["last_update"]
    best = max(evals, key=lambda e: (e["gold_score"], e["heldout_reward"]))
    assert guards["selected_update"] == best["step"]
    # the final evaluation measures the saved output afresh: it is the selected policy, not the last one
    start, final = metrics["start"], metrics["final"]
    assert final["gold_score"] == pytest.approx(best["gold_score"], abs=1e-6)
    assert final["gold_score"] >= start["gold_score"]
    assert final["gold_score"] > evals[-1]["gold_score"]
    assert guards["gold"]["history"][0]["step"] == 0


def test_max_kl_stops_training(tiny_llama, tmp_path):
    manifest, evals = run_toy(tiny_llama, tmp_path / "kl", "--gold_select_best", "false", "--gold_patience", "0",
                              "--max_kl", "0.5")
    guards = manifest["metrics"]["guards"]
    assert guards["stopped_early"] and "passed max_kl 0.5" in guards["stopped_early"]
    assert guards["last_update"] < 20


# -- reward shaping guards (no model) --------------------------------------------------------------------
def test_scores_are_normalised_against_the_start_policy_and_penalised_for_length_drift():
    from stages.core.ppo.guards import shape_scores, start_statistics

    stats = start_statistics(torch.tensor([1.0, 3.0]), torch.tensor([10.0, 30.0]))
    assert stats["mean"] == 2.0 and stats["std"] == pytest.approx(2 ** 0.5) and stats["length"] == 20.0
    raw = torch.tensor([2.0, 2.0 + 2 ** 0.5])
    normalised = shape_scores(raw, torch.tensor([20.0, 20.0]), stats, normalization="start")
    assert normalised.tolist() == pytest.approx([0.0, 1.0])
    # a response half as long as the start policy's mean loses half of length_penalty, one as long loses nothing
    penalised = shape_scores(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([10.0, 20.0, 40.0]), stats, length_penalty=0.4)
    assert penalised.tolist() == pytest.approx([0.8, 1.0, 0.6])
    constant = start_statistics(torch.tensor([1.0, 1.0]), torch.tensor([5.0, 5.0]))
    assert constant["std"] == 1.0  # a constant score is shifted, not divided by zero


def test_gold_tracker_needs_gold_falling_with_reward_rising_patience_times():
    from stages.core.ppo.guards import GoldTracker

    t = GoldTracker(patience=2)
    assert t.observe({"step": 0, "gold_score": 0.5, "heldout_reward": 1.0})
    assert t.observe({"step": 2, "gold_score": 0.6, "heldout_reward": 1.5})
    t.observe({"step": 4, "gold_score": 0.4, "heldout_reward": 1.2})  # gold fell, reward fell too: not counted
    assert t.bad == 0 and not t.should_stop
    t.observe({"step": 6, "gold_score": 0.4, "heldout_reward": 2.0})
    assert t.bad == 1 and not t.should_stop
    t.observe({"step": 8, "gold_score": 0.3, "heldout_reward": 2.5})
    assert t.should_stop and t.best["step"] == 2
    assert t.summary()["best_gold_score"] == 0.6 and t.summary()["start_gold_score"] == 0.5


class _Const:
    def __init__(self, values):
        self.values = values

    def score(self, prompts, responses):
        return list(self.values)


def test_reward_model_ensemble_takes_the_mean_or_the_minimum():
    from stages.core.ppo.rewards import EnsembleReward

    members = [_Const([1.0, 4.0]), _Const([3.0, -2.0])]
    assert EnsembleReward(members, "mean").score(["a", "b"], ["x", "y"]) == [2.0, 1.0]
    assert EnsembleReward(members, "min").score(["a", "b"], ["x", "y"]) == [1.0, -2.0]


def test_a_reward_model_list_becomes_an_ensemble_in_the_config(tmp_path):
    from stages.core.errors import ConfigError
    from stages.core.ppo.config import PPOConfig

    cfg = PPOConfig(output_dir=str(tmp_path), reward_model='["rm_a", "rm_b", "rm_c"]', reward_ensemble="min",
                    report_to="none", use_cpu=True)
    assert cfg.reward_model == "rm_a" and cfg.extra_reward_models == ["rm_b", "rm_c"]
    with pytest.raises(ConfigError, match="reward_ensemble"):
        PPOConfig(output_dir=str(tmp_path), reward_model="rm_a", reward_ensemble="max", report_to="none", use_cpu=True)
    with pytest.raises(ConfigError, match="max_kl_action"):
        PPOConfig(output_dir=str(tmp_path), max_kl_action="panic", report_to="none", use_cpu=True)
    with pytest.raises(ConfigError, match="reward_normalization"):
        PPOConfig(output_dir=str(tmp_path), reward_normalization="batch", report_to="none", use_cpu=True)
    with pytest.raises(ConfigError, match="raise_kl_coef needs a positive kl_coef"):  # 0 x 1.5 would stay 0
        PPOConfig(output_dir=str(tmp_path), max_kl=5.0, max_kl_action="raise_kl_coef", kl_coef=0.0, report_to="none",
                  use_cpu=True)


def test_online_dpo_reads_reward_model_lists_and_checks_the_gold_keys_like_grpo(tmp_path):
    from stages.core.errors import ConfigError
    from stages.core.ppo.online_dpo import OnlineDPOStageConfig

    cfg = OnlineDPOStageConfig(output_dir=str(tmp_path), reward_model='["rm_a", "rm_b"]', report_to="none",
                               use_cpu=True)
    assert cfg.reward_model == "rm_a" and cfg.extra_reward_models == ["rm_b"]
    with pytest.raises(ConfigError, match="gold_eval_steps"):
        OnlineDPOStageConfig(output_dir=str(tmp_path), gold_eval_steps=-1, report_to="none", use_cpu=True)


def test_a_gold_reward_model_counts_in_the_fingerprint_by_content(tmp_path):
    """Retraining the gold reward model in place must re-run the stage (its name is unchanged)."""
    import types

    from stages.core import fingerprints

    gold = tmp_path / "gold_rm"
    gold.mkdir()
    (gold / "model.safetensors").write_bytes(b"first")
    training = types.SimpleNamespace(gold_judge=str(gold))
    args = types.SimpleNamespace(groups={"training": training}, explicit={"gold_judge"}, training=training,
                                 model=types.SimpleNamespace(model_revision=None))
    before = fingerprints.stage_components("ppo", args, None)
    (gold / "model.safetensors").write_bytes(b"second, retrained")
    after = fingerprints.stage_components("ppo", args, None)
    assert before["gold_judge"] != after["gold_judge"]


# -- the over-optimization flag ------------------------------------------------------------------------------
@pytest.mark.parametrize("stats, verifier, judge_is_gold, suspected", [
    ({"win_rate": 0.89, "lc_win_rate": 0.42}, None, False, True),  # the issue's figures: length explains it
    ({"win_rate": 0.80, "lc_win_rate": 0.62}, {"policy_pass_rate": 0.34, "reference_pass_rate": 0.38}, False, True),
    ({"win_rate": 0.80, "lc_win_rate": 0.62}, {"policy_pass_rate": 0.45, "reference_pass_rate": 0.38}, False, False),
    ({"win_rate": 0.80, "lc_win_rate": 0.62}, {"policy_pass_rate": 0.30, "reference_pass_rate": 0.38}, True, False),
    ({"win_rate": 0.45, "lc_win_rate": 0.30}, {"policy_pass_rate": 0.10, "reference_pass_rate": 0.38}, False, False),
    ({"win_rate": 0.70, "lc_win_rate": None}, None, False, False),
])
def test_overoptimization_flag_on_constructed_reports(stats, verifier, judge_is_gold, suspected):
    from reward.report import overoptimization

    flag = overoptimization(stats, verifier, judge_is_gold=judge_is_gold)
    assert flag["suspected"] is suspected
    assert bool(flag["reasons"]) is suspected


def _chain_with_report(tmp_path, report):
    import yaml

    run_dir = tmp_path / "run"
    (run_dir / "ppo_vs_sft").mkdir(parents=True)
    (run_dir / "ppo_vs_sft" / "report.json").write_text(json.dumps(report))
    chain = {"description": "t", "run_dir": str(run_dir), "stages": {"ppo_vs_sft": {
        "stage": "evaluate", "with": {"policy": "runs/x/ppo", "reference": "runs/x/sft", "judge": "rm",
                                      "prompts": "demo:prompts"}}}}
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(chain))
    return path


def _report(win, lc, policy_pass, reference_pass):
    from reward.report import overoptimization

    stats = {"win_rate": win, "tie_rate": 0.0, "n": 32, "interval": [win - 0.1, win + 0.1], "lc_win_rate": lc,
             "lc_interval": [lc - 0.1, lc + 0.1]}
    verifier = {"policy_pass_rate": policy_pass, "reference_pass_rate": reference_pass}
    return {"judge": {"name": "rm", "spec": "runs/x/rm"}, "stats": stats, "verifier": verifier,
            "overoptimization": overoptimization(stats, verifier)}


def test_chain_table_shows_the_gold_metric_and_the_flag_only_when_raised(tmp_path):
    from stages.chain import summarize

    table = summarize(_chain_with_report(tmp_path / "a", _report(0.891, 0.420, 0.344, 0.375)))
    assert "same, length-controlled | 0.420" in table
    assert "gold judge (verifier pass rate) | 0.344 vs 0.375" in table
    assert "**reward over-optimization suspected**" in table
    table = summarize(_chain_with_report(tmp_path / "b", _report(0.70, 0.60, 0.45, 0.375)))
    assert "gold judge (verifier pass rate) | 0.450 vs 0.375" in table
    assert "over-optimization" not in table


def shorter_is_better(prompt, response):
    """A gameable judge: the shorter response scores higher."""
    return -len(response)


def longer_is_better(prompt, response):
    return len(response)


@pytest.mark.parametrize("judge, suspected", [("shorter_is_better", True), ("longer_is_better", False)])
def test_evaluate_stage_flags_a_judge_that_the_gold_verifier_contradicts(tiny_llama, tmp_path, monkeypatch, judge,
                                                                          suspected):
    """End to end through the evaluate stage, with the generations replaced by fixed replies: the policy
    answers "Ok." (fails the demo verifier), the reference gives the demo's verified answers. A judge that
    prefers shorter replies makes the policy win, the gold verifier says otherwise: flagged in report.json,
    report.md and the manifest. A judge that prefers the verified (longer) replies agrees with it: no flag."""
    import reward.generate as G
    import reward.winrate as W
    from stages import evaluate
    from stages.core import demo

    pairs = demo.preference_pairs(12)
    answers = {p["prompt"][0]["content"]: p["chosen"][0]["content"] for p in pairs}
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in pairs))

    def fixed(model_path, prompts, decoding, *, cache_dir, label="model", device=None, log=print):
        texts = [answers[p[-1]["content"]] if label == "reference" else "Ok." for p in prompts]
        return G.Generations(texts, [len(t.split()) for t in texts])

    monkeypatch.setattr(G, "cached_generate", fixed)
    monkeypatch.setattr(W, "is_demo_prompts", lambda prompts: True)  # the demo verifier applies to these prompts
    out = tmp_path / "eval"
    report = evaluate.main(["--policy", str(tiny_llama), "--reference", str(tiny_llama), "--prompts", str(rows),
                            "--judge", f"rule:{{\"verifier\": \"test_ppo_guards:{judge}\"}}", "--out", str(out),
                            "--n_bootstrap", "50"])
    flag = report["overoptimization"]
    assert report["verifier"]["policy_pass_rate"] == 0.0 and report["verifier"]["reference_pass_rate"] == 1.0
    assert report["stats"]["win_rate"] == (1.0 if suspected else 0.0)
    assert flag["suspected"] is suspected
    assert ("over-optimization suspected" in (out / "report.md").read_text()) is suspected
    assert json.loads((out / "manifest.json").read_text())["metrics"]["overoptimization_suspected"] is suspected


def test_grpo_logs_the_gold_evaluations_and_outputs_the_best_policy_by_gold(tiny_llama, tmp_path):
    from stages import grpo

    out = tmp_path / "grpo"
    grpo.main(["--config", str(ROOT / "recipes/tiny/grpo.yaml"), "--model_name_or_path", str(tiny_llama),
               "--output_dir", str(out), "--reward", PROXY, "--gold_judge", GOLD, "--gold_eval_steps", "2",
               "--gold_patience", "0", "--max_steps", "12", "--learning_rate", "5e-2"])
    manifest = json.loads((out / "manifest.json").read_text())
    evals = [h for h in json.loads((out / "metrics.json").read_text())["log_history"] if "gold_score" in h]
    assert [e["step"] for e in evals] == list(range(0, 13, 2))
    assert all({"heldout_reward", "kl_to_reference", "response_length"} <= set(e) for e in evals)
    assert evals[-1]["kl_to_reference"] > 0  # KL to the adapter-disabled (starting) policy
    best = max(evals, key=lambda e: (e["gold_score"], e["heldout_reward"]))
    assert best["step"] != evals[-1]["step"], evals  # measured: the gold score peaks mid-run on this toy task
    guards = manifest["metrics"]["guards"]
    assert guards["selected_step"] == best["step"]
    # the final evaluation re-measures the weights that are saved: the best policy's, not the last one's
    assert manifest["metrics"]["final"]["gold_score"] == pytest.approx(best["gold_score"], abs=1e-6)


def test_max_kl_raise_kl_coef_multiplies_the_coefficient_instead_of_stopping():
    from types import SimpleNamespace

    from stages.core.ppo.losses import KLController
    from stages.core.ppo.trainer import PPOTrainer

    trainer = SimpleNamespace(cfg=SimpleNamespace(max_kl=5.0, max_kl_action="raise_kl_coef"), kl=KLController(0.1),
                              stopped=None, log=lambda m: None)
    logs = {"objective/kl": 4.0, "kl_coef": 0.1}
    PPOTrainer.kl_guard(trainer, logs)
    assert trainer.kl.value == 0.1 and trainer.stopped is None  # below the limit: nothing happens
    logs = {"objective/kl": 6.0, "kl_coef": 0.1}
    PPOTrainer.kl_guard(trainer, logs)
    assert trainer.kl.value == pytest.approx(0.15) and logs["kl_coef"] == pytest.approx(0.15) and trainer.stopped is None


from test_ppo_stage import reward_models  # noqa: E402,F401  (a LoRA and a full reward model on the tiny Llama)


def test_a_reward_model_list_trains_on_the_ensemble_minimum(tiny_llama, reward_models, tmp_path):  # noqa: F811
    from reward.model import load_reward_model
    from stages.core.ppo import rewards as RW
    from stages.core.ppo.config import PPOConfig

    lora_rm, full_rm = (str(p) for p in reward_models)
    cfg = PPOConfig(output_dir=str(tmp_path / "x"), reward_model=json.dumps([lora_rm, full_rm]), reward_ensemble="min",
                    report_to="none", use_cpu=True, bf16=False)
    first = load_reward_model(lora_rm, device="cpu")
    combined = RW.combine(cfg, first, device="cpu")
    prompts, replies = ["Say hello.", "Name a colour."], ["Hello there!", "blue blue blue blue"]
    one, two = first.score(prompts, replies), load_reward_model(full_rm, device="cpu").score(prompts, replies)
    assert one != two  # two different models, so min is not trivially either
    assert combined.score(prompts, replies) == pytest.approx([min(a, b) for a, b in zip(one, two)])
    out = tmp_path / "ppo"  # and the stage runs with it
    ppo.main(["--config", TINY, "--model_name_or_path", str(tiny_llama), "--output_dir", str(out), "--max_steps", "1",
              "--reward_model", json.dumps([lora_rm, full_rm]), "--reward_ensemble", "min", "--save_strategy", "no",
              "--reward_normalization", "start", "--length_penalty", "0.1"])
    guards = json.loads((out / "manifest.json").read_text())["metrics"]["guards"]
    assert guards["reward_models"] == [lora_rm, full_rm] and guards["reward_ensemble"] == "min"
    assert guards["start_statistics"]["samples"] == 16 and guards["start_statistics"]["std"] > 0
