"""The evaluation stage and `rlhf winrate` end to end on tiny models; generation and its cache; the callback."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reward import generate as G
from reward import winrate_cli
from reward.callbacks import WinRateCallback
from stages import evaluate
from stages.core import demo

BASE_ARGS = ["--judge", "verifier", "--prompts", "demo:prompts", "--max_prompts", "6", "--max_new_tokens", "8",
             "--batch_size", "4"]


def _peft_dir(base_dir, out, config):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lora_policy(tiny_llama, tmp_path_factory):
    """A LoRA stage output (merged on load) whose manifest holds the base-model comparison."""
    from peft import LoraConfig

    out = _peft_dir(tiny_llama, tmp_path_factory.mktemp("run") / "dpo",
                    LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                               task_type="CAUSAL_LM"))
    (out / "manifest.json").write_text(json.dumps({
        "status": "complete", "stage": "sft", "fingerprint": "f00d", "finished_at": "2026-11-01T00:00:00Z",
        "metrics": {"base": {"base_loss": 3.0}, "final": {"eval_loss": 2.0}}}))
    return out


@pytest.fixture(scope="module")
def prompt_reference(tiny_llama, tmp_path_factory):
    """A prompt-tuning output: not mergeable, loaded through PeftModel."""
    from peft import PromptTuningConfig

    return _peft_dir(tiny_llama, tmp_path_factory.mktemp("ref") / "sft",
                     PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))


@pytest.fixture
def gen_calls(monkeypatch):
    calls = []
    orig = G.generate_responses

    def counting(model, tokenizer, prompts, decoding):
        calls.append(len(prompts))
        return orig(model, tokenizer, prompts, decoding)

    monkeypatch.setattr(G, "generate_responses", counting)
    return calls


def run_eval(policy, reference, out, *extra):
    return evaluate.main(["--policy", str(policy), "--reference", str(reference), "--out", str(out), *BASE_ARGS, *extra])


def test_evaluate_writes_the_report_and_reuses_cached_generations(lora_policy, prompt_reference, tmp_path, gen_calls,
                                                                 capsys):
    out = tmp_path / "eval"
    first = run_eval(lora_policy, prompt_reference, out)
    assert gen_calls == [6, 6]  # policy and reference generated once each
    assert {"report.json", "report.md", "winrate.png", "per_prompt.jsonl", "manifest.json"} <= {p.name for p in out.iterdir()}
    assert len(list((out / "generations").glob("*.json"))) == 2
    rep = json.loads((out / "report.json").read_text())
    assert rep["stats"]["n"] == 6 and rep["stats"]["win_rate"] == first["stats"]["win_rate"]
    assert rep["verifier"] is not None and set(rep["verifier"]) == {"policy_pass_rate", "reference_pass_rate"}
    assert rep["base_comparison"]["rows"] == [{"metric": "loss", "base": 3.0, "final": 2.0}]
    assert rep["decoding"] == {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "seed": 0, "batch_size": 4}
    assert not rep["generation"]["policy"]["cached"] and all(r["len_policy"] <= 8 for r in rep["per_prompt"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["stage"] == "evaluate"

    # statistics-only change: judged again, nothing regenerated, same responses
    second = run_eval(lora_policy, prompt_reference, out, "--n_bootstrap", "300")
    assert gen_calls == [6, 6]
    assert second["generation"]["policy"]["cached"] and second["generation"]["reference"]["cached"]
    assert [r["policy"] for r in second["per_prompt"]] == [r["policy"] for r in first["per_prompt"]]
    capsys.readouterr()
    # nothing changed at all: the stage does nothing
    run_eval(lora_policy, prompt_reference, out, "--n_bootstrap", "300")
    assert "nothing to do" in capsys.readouterr().out and gen_calls == [6, 6]
    # decoding changed: both regenerate
    run_eval(lora_policy, prompt_reference, out, "--max_new_tokens", "5")
    assert gen_calls == [6, 6, 6, 6]


def test_a_changed_model_invalidates_only_its_own_generations(lora_policy, prompt_reference, tmp_path, gen_calls):
    import shutil

    policy = tmp_path / "policy"
    shutil.copytree(lora_policy, policy)
    out = tmp_path / "eval"
    run_eval(policy, prompt_reference, out)
    m = json.loads((policy / "manifest.json").read_text())
    (policy / "manifest.json").write_text(json.dumps(dict(m, finished_at="2026-11-02T00:00:00Z")))  # retrained
    run_eval(policy, prompt_reference, out)
    assert gen_calls == [6, 6, 6]  # only the policy regenerated


def test_batched_left_padded_generation_matches_one_at_a_time(tiny_llama):
    model, tok = G.load_for_generation(str(tiny_llama))
    assert tok.padding_side == "left" and tok.pad_token_id != tok.eos_token_id
    prompts = [r["prompt"] for r in demo.load("prompts")[:3]] + ["Hi"]  # very different lengths: real padding
    batched = G.generate_responses(model, tok, prompts, G.Decoding(max_new_tokens=8, batch_size=4))
    single = G.generate_responses(model, tok, prompts, G.Decoding(max_new_tokens=8, batch_size=1))
    assert batched.responses == single.responses and batched.n_tokens == single.n_tokens
    s1 = G.generate_responses(model, tok, prompts, G.Decoding(max_new_tokens=8, temperature=1.0, seed=3))
    s2 = G.generate_responses(model, tok, prompts, G.Decoding(max_new_tokens=8, temperature=1.0, seed=3))
    assert s1.responses == s2.responses  # sampling is seeded
    assert G.cache_key(tiny_llama, prompts, G.Decoding()) != G.cache_key(tiny_llama, prompts[:-1], G.Decoding())


def test_evaluate_with_a_reward_model_judge(lora_policy, tiny_llama, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = tmp_path / "rm"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
    model.save_pretrained(rm)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(rm)
    rep = evaluate.main(["--policy", str(lora_policy), "--reference", str(tiny_llama), "--out", str(tmp_path / "o"),
                         *BASE_ARGS[:-6], "--judge", str(rm), "--max_prompts", "4", "--max_new_tokens", "6"])
    assert rep["judge"]["name"].startswith("reward_model:")
    rows = rep["per_prompt"]
    assert len(rows) == 4 and all(isinstance(r["score_policy"], float) for r in rows)
    assert all(r["outcome"] == (1.0 if r["score_policy"] > r["score_reference"] else
                                0.0 if r["score_policy"] < r["score_reference"] else 0.5) for r in rows)
    assert "agreement_with_verifier" in rep["judge_details"]  # the judge's own quality on demo prompts


def test_rlhf_winrate_main_end_to_end(lora_policy, prompt_reference, capsys):
    rc = winrate_cli.main(["--policy", str(lora_policy), "--reference", str(prompt_reference), *BASE_ARGS])
    assert rc == 0
    printed = capsys.readouterr().out
    out = Path(winrate_cli.default_out(str(lora_policy), str(prompt_reference)))
    assert out == lora_policy.parent / "winrate-dpo-vs-sft"
    rep = json.loads((out / "report.json").read_text())
    st = rep["stats"]
    assert f"win rate {st['win_rate']:.3f}  95% CI {st['interval'][0]:.3f}-{st['interval'][1]:.3f}" in printed
    assert "verifier pass rate" in printed and str(out / "report.md") in printed


def test_rlhf_winrate_user_errors_are_one_line(lora_policy, tmp_path, capsys):
    rc = winrate_cli.main(["--policy", str(lora_policy), "--reference", str(lora_policy), "--judge", "verifier",
                           "--prompts", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "missing.jsonl" in err and "Traceback" not in err
    rc = winrate_cli.main(["--policy", str(lora_policy), "--reference", str(lora_policy), "--judge", "no-such-judge",
                           "--prompts", "demo:prompts", "--out", str(tmp_path / "o")])
    assert rc == 2 and "judge: unknown spec 'no-such-judge'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before generating anything


def test_winrate_callback_runs_during_a_tiny_sft_training(tiny_llama, tmp_path, monkeypatch):
    from stages import sft
    from stages.core import stage as S

    cb = WinRateCallback("demo:prompts", judge="verifier", every=1, max_prompts=4,
                         decoding=G.Decoding(max_new_tokens=6), out_dir=tmp_path / "wr", n_boot=200)
    from stages.core.lifecycle import StageRun

    orig = StageRun.callbacks
    monkeypatch.setattr(StageRun, "callbacks", lambda self: orig(self) + [cb])
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "sft"
    sft.main(["--config", str(root / "recipes/tiny/sft.yaml"), "--model_name_or_path", str(tiny_llama),
              "--output_dir", str(out), "--max_steps", "3"])
    steps = [h["step"] for h in cb.history]
    assert steps == [3, 3]  # the step-3 and the final evaluation (not the "base" one before training)
    assert all(0.0 <= h["winrate"] <= 1.0 and h["winrate_ci_low"] <= h["winrate"] <= h["winrate_ci_high"]
               for h in cb.history)
    assert all("winrate_policy_pass_rate" in h for h in cb.history)  # demo prompts: verifier pass rate too
    logged = json.loads((out / "metrics.json").read_text())["log_history"]
    assert [h["step"] for h in logged if "winrate" in h] == steps  # in the stage's saved history
    assert (tmp_path / "wr" / "step-3" / "report.json").is_file()


def test_callback_reference_defaults_to_the_starting_policy(tiny_llama):
    """Without a PEFT adapter the reference is a snapshot at train begin: an unchanged model ties everywhere."""
    from types import SimpleNamespace

    model, tok = G.load_for_generation(str(tiny_llama))
    tok.padding_side = "right"  # as in training; the callback switches to left padding and back
    cb = WinRateCallback([r["prompt"] for r in demo.load("prompts")[:3]], judge="verifier", every=2,
                         decoding=G.Decoding(max_new_tokens=4), n_boot=100)
    state = SimpleNamespace(is_world_process_zero=True, global_step=5, epoch=1.0, log_history=[])
    cb.on_train_begin(None, state, None, model=model, processing_class=tok)
    assert cb._ref is not None and len(cb._ref.responses) == 3
    metrics = {"eval_loss": 1.0}
    cb.on_evaluate(None, state, None, metrics=metrics, model=model, processing_class=tok)
    assert cb.history == []  # every=2: the first evaluation is skipped
    cb.on_evaluate(None, state, None, metrics={"base_loss": 2.0}, model=model, processing_class=tok)  # not counted
    cb.on_evaluate(None, state, None, metrics=metrics, model=model, processing_class=tok)
    assert [h["winrate"] for h in cb.history] == [0.5] and cb.history[0]["winrate_tie_rate"] == 1.0
    assert metrics["eval_winrate"] == 0.5 and state.log_history[-1]["step"] == 5
    assert tok.padding_side == "right"


def test_winrate_callback_leaves_the_training_rng_where_it_was(tiny_llama, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)
    cb = WinRateCallback("demo:prompts", judge="verifier", every=1, max_prompts=2,
                         decoding=G.Decoding(max_new_tokens=3, temperature=1.0, seed=7), out_dir=tmp_path / "wr", n_boot=50)
    class State:
        global_step, epoch, is_world_process_zero, log_history = 1, 1.0, True, []

    cb.on_train_begin(None, State(), None, model=model, processing_class=tok)
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    cb.on_evaluate(None, State(), None, metrics={"eval_loss": 1.0}, model=model, processing_class=tok)
    assert cb.history  # it did generate and judge
    assert torch.equal(torch.rand(4), expected)  # the sampling seed did not leak into training's stream
