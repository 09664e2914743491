"""The SFT stage end to end on tiny models: artifact, manifest, skip, resume, early stopping, errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages import sft
from stages.core import stage as S
from stages.core.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes/tiny/sft.yaml")


def run_sft(model, out, *extra):
    return sft.main(["--config", TINY, "--model_name_or_path", str(model), "--output_dir", str(out), *extra])


def manifest(out):
    return json.loads((Path(out) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "sft"
    run_sft(tiny_llama, out)
    return out


def test_sft_writes_a_complete_artifact_with_lineage(trained, tiny_llama):
    files = {p.name for p in trained.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "manifest.json", "metrics.json", "curves.png"} <= files
    assert "chat_template.jinja" in files or "chat_template" in (trained / "tokenizer_config.json").read_text()
    assert not any(f.endswith(".bin") for f in files)  # safetensors only
    m = manifest(trained)
    assert m["status"] == "complete" and m["stage"] == "sft" and m["peft_method"] == "lora"
    assert m["base_model"] == str(tiny_llama)
    assert m["config"]["training"]["learning_rate"] == 5e-3
    assert m["data"]["train_size"] > 0 and m["fingerprint"]
    assert m["packages"]["trl"] and "git_commit" in m
    assert 0 < m["trainable"]["trainable_pct"] < 100
    assert not (trained.parent / ".sft.work").exists()  # checkpoints removed once complete
    assert list((trained / "logs").rglob("events.out.tfevents.*"))  # TensorBoard on by default
    # the adapter points at the model it was trained on
    assert json.loads((trained / "adapter_config.json").read_text())["base_model_name_or_path"] == str(Path(tiny_llama).resolve())


def test_validation_loss_is_compared_with_the_base_and_improves(trained):
    metrics = manifest(trained)["metrics"]
    base, final = metrics["base"]["base_loss"], metrics["final"]["eval_loss"]
    assert final < base, (base, final)


def test_rerun_with_same_config_skips_and_changed_config_refuses(trained, tiny_llama, capsys):
    before = (trained / "manifest.json").read_text()
    run_sft(tiny_llama, trained)
    assert "nothing to do" in capsys.readouterr().out
    assert (trained / "manifest.json").read_text() == before
    with pytest.raises(ConfigError, match="different inputs.*learning_rate"):
        run_sft(tiny_llama, trained, "--learning_rate", "0.001")


class _Crash(Exception):
    pass


def test_interrupted_run_leaves_no_artifact_and_resumes(tiny_llama, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    class CrashAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 4:
                raise _Crash()

    from stages.core.lifecycle import StageRun

    orig = StageRun.callbacks
    monkeypatch.setattr(StageRun, "callbacks", lambda self: orig(self) + [CrashAfter()])
    out = tmp_path / "sft"
    with pytest.raises(_Crash):
        run_sft(tiny_llama, out)
    assert not out.exists()  # nothing complete-looking
    ckpts = sorted(p.name for p in (tmp_path / ".sft.work" / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-3"]
    class FirstStep(TrainerCallback):
        first = None

        def on_step_end(self, args, state, control, **kw):
            FirstStep.first = FirstStep.first or state.global_step

    monkeypatch.setattr(StageRun, "callbacks", lambda self: orig(self) + [FirstStep()])
    run_sft(tiny_llama, out)
    assert FirstStep.first == 4  # training continued from checkpoint-3, not from scratch
    assert manifest(out)["status"] == "complete"


def test_a_resume_under_length_grouping_ends_where_an_uninterrupted_run_does(tiny_llama, tmp_path, monkeypatch):
    """The grouped order is drawn from (seed, epoch), not from the global RNG: a resumed run reaches the epoch's
    first batch with a different RNG history (here: a callback draws from it, as checkpoint loading and ZeRO-3
    partitioning do) and must still skip the batches it already trained on, not those of another order."""
    import torch
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from stages.core.lifecycle import StageRun

    exact = ("--lora_dropout", "0", "--group_by_length", "true")
    whole = tmp_path / "whole"
    run_sft(tiny_llama, whole, *exact)

    class CrashAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 4:
                raise _Crash()

    class DrawOnBegin(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            torch.rand(17)

    orig = StageRun.callbacks
    monkeypatch.setattr(StageRun, "callbacks", lambda self: orig(self) + [CrashAfter()])
    out = tmp_path / "sft"
    with pytest.raises(_Crash):
        run_sft(tiny_llama, out, *exact)
    monkeypatch.setattr(StageRun, "callbacks", lambda self: orig(self) + [DrawOnBegin()])
    run_sft(tiny_llama, out, *exact)
    got, want = load_file(str(out / "adapter_model.safetensors")), load_file(str(whole / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5, msg=k)


def test_the_length_grouped_order_depends_on_seed_and_epoch_only():
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from stages.core.sampling import SeededLengthGroupedSampler, seed_length_grouping

    lengths = [(i * 37) % 101 + 1 for i in range(64)]
    orders = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        sampler = SeededLengthGroupedSampler(4, lengths=lengths, seed=7)
        orders.append(list(sampler))
    assert orders[0] == orders[1] and sorted(orders[0]) == list(range(64))
    sampler.set_epoch(1)
    assert list(sampler) != orders[0]  # a new epoch reshuffles
    assert list(SeededLengthGroupedSampler(4, lengths=lengths, seed=8)) != orders[0]

    class Trainer:  # the one method and field seed_length_grouping uses
        args = type("Args", (), {"seed": 3, "data_seed": None})()

        def _get_train_sampler(self, train_dataset=None):
            return LengthGroupedSampler(4, lengths=lengths)

    trainer = Trainer()
    seed_length_grouping(trainer)
    wrapped = trainer._get_train_sampler()
    assert isinstance(wrapped, SeededLengthGroupedSampler) and wrapped.seed == 3 and wrapped.lengths == lengths


def test_early_stopping_keeps_the_best_checkpoint(tiny_llama, tmp_path):
    out = tmp_path / "sft"
    run_sft(tiny_llama, out, "--learning_rate", "3.0", "--max_steps", "30", "--eval_steps", "1", "--save_steps", "1",
            "--early_stopping_patience", "1", "--logging_steps", "1")
    m = manifest(out)
    hist = json.loads((out / "metrics.json").read_text())["log_history"]
    last_step = max(h["step"] for h in hist)
    assert last_step < 30  # stopped early
    evals = [h["eval_loss"] for h in hist if "eval_loss" in h]
    assert m["metrics"]["final"]["eval_loss"] == pytest.approx(min(evals), rel=1e-4)


def test_trl_cli_config_runs_unchanged(tiny_qwen2, tmp_path):
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": f"{w}!"}]}
            for w in ["red", "green", "blue", "cyan", "pink", "gold", "grey", "teal"] * 3]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {  # a config as written for `trl sft --config`
        "model_name_or_path": str(tiny_qwen2), "dataset_name": str(data), "learning_rate": 2.0e-4,
        "max_steps": 2, "per_device_train_batch_size": 2, "use_peft": True, "lora_r": 4, "lora_alpha": 8,
        "output_dir": str(tmp_path / "out"), "report_to": "none", "bf16": True, "gradient_checkpointing": True,
        "logging_steps": 1,
    }
    (tmp_path / "trl.yaml").write_text(yaml.safe_dump(cfg))
    sft.main(["--config", str(tmp_path / "trl.yaml")])
    m = manifest(tmp_path / "out")
    assert m["peft_method"] == "lora" and m["data"]["train_size"] > 0


def test_bad_data_names_file_row_field_and_writes_nothing(tiny_llama, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]})
                   + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl.*row 1.*content"):
        run_sft(tiny_llama, tmp_path / "out", "--datasets", str(bad))
    assert not (tmp_path / "out").exists()


def test_cli_exit_code_and_one_line_error(tiny_llama, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stages.sft", "--config", TINY, "--model_name_or_path", str(tiny_llama),
                           "--output_dir", str(tmp_path / "o"), "--datasets", str(tmp_path / "missing.jsonl")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "missing.jsonl" in proc.stderr and "Traceback" not in proc.stderr


def test_a_checkpoint_cut_short_while_saving_is_not_resumed_from(tmp_path):
    from stages.core.artifacts import StageOutput

    out = StageOutput(tmp_path / "sft", "sft")
    out.prepare()
    for step, complete in ((3, True), (6, True), (9, False)):  # checkpoint-9: killed before trainer_state.json
        d = out.checkpoints / f"checkpoint-{step}"
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"x")
        if complete:
            (d / "trainer_state.json").write_text("{}")
    assert out.last_checkpoint() == str(out.checkpoints / "checkpoint-6")


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "tiny_gpt2"])
def test_padding_free_batch_gives_the_padded_batch_loss(fixture, request):
    """The default SFT batching concatenates rows; attention must stay within each row."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from stages.core.encode import encode_sft

    path = request.getfixturevalue(fixture)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    rows = Dataset.from_list([{"messages": [{"role": "user", "content": "hi " * n},
                                            {"role": "assistant", "content": "ok yes " * (n + 1)}]} for n in (1, 5, 9)])
    ds, _ = encode_sft(rows, tok, max_length=None)
    losses = {}
    for free in (False, True):
        batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=free)(list(ds))
        assert ("attention_mask" in batch) is not free and (batch["input_ids"].shape[0] == 1) is free
        keep = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels") if k in batch}
        with torch.no_grad():
            losses[free] = model(**keep, use_cache=False).loss.item()
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


def test_padding_free_follows_the_hardware_unless_the_recipe_sets_it(trained, tiny_llama, tmp_path):
    from stages.core import runtime

    assert manifest(trained)["config"]["training"]["padding_free"] is runtime.cuda_available()  # CPU: padded
    assert manifest(trained)["config"]["training"]["max_length"] is not None  # recorded as the recipe gave it
    run_sft(tiny_llama, tmp_path / "free", "--padding_free", "true", "--max_steps", "2")
    m = manifest(tmp_path / "free")
    assert m["config"]["training"]["padding_free"] is True and m["status"] == "complete"


def test_checkpointing_goes_back_on_only_when_activations_exceed_the_memory_budget(tiny_llama, tmp_path, monkeypatch):
    from types import SimpleNamespace as NS

    from stages.core import runtime

    cfg = NS(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9)  # SmolLM2-135M
    need = runtime.activation_bytes(cfg, 8, 256)
    assert need == 30 * 2048 * (36960 + 63 * 256)  # ~52 KB per token and layer at 256 (eager): 3.3 GB
    assert runtime.layers_without_checkpointing(cfg, 8, 256, runtime.memory_budget(None, available=4 * 2**30)) < 30
    assert runtime.layers_without_checkpointing(cfg, 8, 256, runtime.memory_budget(8.0)) == 30
    if runtime.cuda_available():
        return
    monkeypatch.setattr(runtime, "available_memory", lambda: 1024)  # a machine with no memory to spare
    run_sft(tiny_llama, tmp_path / "tight", "--max_steps", "1")
    tight = manifest(tmp_path / "tight")
    assert tight["config"]["training"]["activation_checkpointing"] is True  # what transformers 5 reads
    assert tight["derived"]["gradient_checkpointing"] is True
    run_sft(tiny_llama, tmp_path / "insist", "--max_steps", "1", "--gradient_checkpointing", "false")
    assert manifest(tmp_path / "insist")["config"]["training"]["gradient_checkpointing"] is False
    monkeypatch.undo()
    run_sft(tiny_llama, tmp_path / "roomy", "--max_steps", "1")
    assert manifest(tmp_path / "roomy")["config"]["training"]["gradient_checkpointing"] is False


def test_each_cpu_fast_path_has_a_recipe_key_that_turns_it_off(tiny_llama, tmp_path, capsys):
    run_sft(tiny_llama, tmp_path / "on", "--max_steps", "1")
    on = capsys.readouterr().out
    assert "compact LM head" in on and "bf16 frozen weights" in on
    run_sft(tiny_llama, tmp_path / "off", "--max_steps", "1", "--compact_lm_head", "false", "--bf16_frozen_weights", "false")
    off = capsys.readouterr().out
    assert "compact LM head" not in off and "bf16 frozen weights" not in off
