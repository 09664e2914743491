"""`rlhf export`: merged standalone models equal base + adapter, reload without the suite; non-mergeable
adapters export as base + adapter with a note; atomic, no overwrite without --force; push up to the network."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages import export
from stages.core.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[0, 5, 17, 42, 99, 123, 7, 250, 3, 11]])


def _base_model(base, task="causal_lm"):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "seq_cls":
        return AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def make_adapter_output(base, out, peft_config, *, seed=0, stage="sft", base_model=None, task="causal_lm"):
    """A stage-output-like directory: a randomly initialised (non-identity) adapter on `base`, tokenizer, manifest."""
    from peft import get_peft_model
    from transformers import AutoTokenizer

    if peft_config.peft_type == "BOTTLENECK" or str(peft_config.peft_type) == "BOTTLENECK":
        import stages.core.bottleneck  # noqa: F401
    model = get_peft_model(_base_model(base, task), peft_config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    cfg = json.loads((Path(out) / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(Path(base).resolve())
    (Path(out) / "adapter_config.json").write_text(json.dumps(cfg))
    manifest = {"status": "complete", "stage": stage, "base_model": base_model or str(base),
                "peft_method": str(peft_config.peft_type).lower(), "parent": {"path": str(base)},
                "fingerprint": f"fp-{stage}-{seed}"}
    if task == "seq_cls":
        manifest["task"] = "reward_model"
    (Path(out) / "manifest.json").write_text(json.dumps(manifest))
    return Path(out)


def peft_logits(base_model, adapter_dir, ids=IDS):
    from peft import PeftModel

    with torch.no_grad():
        return PeftModel.from_pretrained(base_model, str(adapter_dir)).eval()(input_ids=ids).logits


def plain_logits(path, ids=IDS, task="causal_lm"):
    with torch.no_grad():
        return _base_model(path, task).eval()(input_ids=ids).logits


def lora(**kw):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", **kw)


def assert_standalone(out):
    names = {p.name for p in out.rglob("*")}
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names), names
    assert "model.safetensors" in names and "README.md" in names
    assert "adapter_config.json" not in names
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["use_cache"] is True
    assert "chat_template.jinja" in names or "chat_template" in (out / "tokenizer_config.json").read_text()


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merged_export_equals_base_plus_adapter(method, tiny_llama, tmp_path):
    from peft import IA3Config

    cfg = IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                    feedforward_modules=["down_proj"]) if method == "ia3" else lora(use_dora=method == "dora")
    run = make_adapter_output(tiny_llama, tmp_path / "run" / "sft", cfg)
    expected = peft_logits(_base_model(tiny_llama), run)
    assert not torch.allclose(expected, plain_logits(tiny_llama), atol=1e-3)  # the adapter matters

    out = export.main([str(run), "--out", str(tmp_path / "exported")])
    assert_standalone(out)
    assert json.loads((out / "export.json").read_text())["kind"] == "merged"
    torch.testing.assert_close(plain_logits(out), expected, atol=1e-5, rtol=1e-5)


FRESH = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, ids = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(path).eval()
tok = AutoTokenizer.from_pretrained(path)
text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
with torch.no_grad():
    logits = model(input_ids=torch.tensor(ids)).logits
suite = sorted(m for m in sys.modules if m == "stages" or m.startswith(("stages.", "reward")))
print(json.dumps({"logits": logits.tolist(), "template": text, "suite": suite, "pad": tok.pad_token_id}))
"""


def test_export_reloads_in_a_fresh_process_without_the_suite(tiny_qwen2, tmp_path):
    run = make_adapter_output(tiny_qwen2, tmp_path / "sft", lora(use_dora=True))
    expected = peft_logits(_base_model(tiny_qwen2), run)
    out = export.main([str(run), "--out", str(tmp_path / "exported")])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", FRESH, str(out), json.dumps(IDS.tolist())], capture_output=True,
                       text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["suite"] == []
    assert "<|im_start|>assistant" in got["template"] and got["pad"] is not None
    torch.testing.assert_close(torch.tensor(got["logits"]), expected, atol=1e-5, rtol=1e-5)


def test_adapter_trained_on_a_merged_parent_merges_recursively(tiny_llama, tmp_path):
    from peft import PeftModel

    sft = make_adapter_output(tiny_llama, tmp_path / "sft", lora(), seed=1)
    merged_sft = PeftModel.from_pretrained(_base_model(tiny_llama), str(sft)).merge_and_unload()
    merged_dir = tmp_path / "merged_sft"  # only to build the second adapter on the right weights
    merged_sft.save_pretrained(merged_dir)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(merged_dir)
    dpo = make_adapter_output(merged_dir, tmp_path / "dpo", lora(), seed=2, stage="dpo")
    cfg = json.loads((dpo / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(sft)  # as a stage records it: the parent stage output
    (dpo / "adapter_config.json").write_text(json.dumps(cfg))
    expected = peft_logits(_base_model(merged_dir), dpo)
    import shutil

    shutil.rmtree(merged_dir)
    out = export.main([str(dpo), "--out", str(tmp_path / "exported")])
    assert_standalone(out)
    torch.testing.assert_close(plain_logits(out), expected, atol=1e-5, rtol=1e-5)


def test_reward_model_exports_as_a_sequence_classifier(tiny_llama, tmp_path):
    from peft import LoraConfig

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS")
    run = make_adapter_output(tiny_llama, tmp_path / "rm", cfg, stage="rm", task="seq_cls")
    expected = peft_logits(_base_model(tiny_llama, "seq_cls"), run)
    out = export.main([str(run), "--out", str(tmp_path / "exported")])
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    torch.testing.assert_close(plain_logits(out, task="seq_cls"), expected, atol=1e-5, rtol=1e-5)


def test_prefix_tuning_exports_base_plus_adapter_with_a_note(tiny_llama, tmp_path, capsys):
    from peft import PrefixTuningConfig

    run = make_adapter_output(tiny_llama, tmp_path / "sft", PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    expected = peft_logits(_base_model(tiny_llama), run)
    out = export.main([str(run), "--out", str(tmp_path / "exported")])
    assert "cannot be merged" in capsys.readouterr().out
    info = json.loads((out / "export.json").read_text())
    assert info["kind"] == "base+adapter" and info["peft_type"] == "PREFIX_TUNING"
    assert (out / "base" / "model.safetensors").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "config.json").exists()  # nothing at the top pretends to be the trained model
    readme = (out / "README.md").read_text()
    assert "cannot be merged" in readme and "PeftModel.from_pretrained" in readme
    assert not any(p.suffix in (".bin", ".pt") for p in out.rglob("*"))
    torch.testing.assert_close(peft_logits(_base_model(out / "base"), out / "adapter"), expected)
    # the adapter finds its base through the relative path (what `rlhf chat EXPORT` uses)
    model, kind = export.load_for_inference(out / "adapter")
    assert kind == "base+adapter"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, expected)


def test_bottleneck_export_says_the_suite_must_be_imported(tiny_llama, tmp_path):
    from stages.core.bottleneck import BottleneckConfig

    run = make_adapter_output(tiny_llama, tmp_path / "sft", BottleneckConfig(bottleneck_size=8, task_type="CAUSAL_LM"))
    out = export.main([str(run), "--out", str(tmp_path / "exported")])
    readme = (out / "README.md").read_text()
    assert "import stages.core.bottleneck" in readme and "BOTTLENECK" in readme
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"


def test_no_merge_keeps_a_lora_adapter_separate(tiny_llama, tmp_path):
    run = make_adapter_output(tiny_llama, tmp_path / "sft", lora())
    out = export.main([str(run), "--out", str(tmp_path / "exported"), "--no-merge"])
    assert json.loads((out / "export.json").read_text())["kind"] == "base+adapter"
    torch.testing.assert_close(peft_logits(_base_model(out / "base"), out / "adapter"),
                               peft_logits(_base_model(tiny_llama), run))


def test_qlora_adapter_is_merged_into_the_unquantized_base(tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from tiny_models import save_tiny

    base = save_tiny(tmp_path / "tiny64", "llama", hidden=64)  # bitsandbytes' CPU 4-bit blocks need >= 64
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, quantization_config=q), lora())
    run = tmp_path / "qlora"
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(run)
    (run / "manifest.json").write_text(json.dumps({"status": "complete", "stage": "sft", "peft_method": "qlora"}))
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(base).save_pretrained(run)
    out = export.main([str(run), "--out", str(tmp_path / "exported")])
    assert_standalone(out)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.float32}  # no packed 4-bit weights
    # merged into the full-precision base: equals base (fp32) + adapter, not the 4-bit model
    torch.testing.assert_close(plain_logits(out), peft_logits(_base_model(base), run), atol=1e-5, rtol=1e-5)


def test_full_model_output_exports_with_cache_on_and_bf16(tiny_llama, tmp_path):
    import shutil

    run = tmp_path / "full"
    shutil.copytree(tiny_llama, run)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(cfg | {"use_cache": False}))
    (run / "manifest.json").write_text(json.dumps({"status": "complete", "stage": "sft", "peft_method": "full"}))
    out = export.main([str(run), "--out", str(tmp_path / "exported"), "--dtype", "bfloat16"])
    assert_standalone(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    torch.testing.assert_close(plain_logits(out).float(), plain_logits(tiny_llama), atol=0.1, rtol=0.05)


def test_force_replaces_only_a_previous_export_and_never_a_user_folder_or_the_source(tiny_llama, tmp_path, monkeypatch):
    run = make_adapter_output(tiny_llama, tmp_path / "sft", lora())
    out = tmp_path / "exported"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for flags in ([], ["--force"]):  # a folder the suite did not write survives, with or without --force
        with pytest.raises(ConfigError, match="not an export"):
            export.main([str(run), "--out", str(out), *flags])
        assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="contains the stage output"):  # the parent of the source
        export.main([str(run), "--out", str(tmp_path), "--force"])
    assert (run / "manifest.json").is_file()
    (out / "keep.txt").unlink()
    out.rmdir()

    export.main([str(run), "--out", str(out)])
    first = (out / "export.json").read_text()
    with pytest.raises(ConfigError, match="previous export"):  # a previous export needs --force
        export.main([str(run), "--out", str(out)])

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "save_standalone", boom)
    with pytest.raises(RuntimeError):
        export.main([str(run), "--out", str(out), "--force"])
    assert (out / "export.json").read_text() == first  # the old export survives a failed one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "sft"]  # no temp dir left
    monkeypatch.undo()
    export.main([str(run), "--out", str(out), "--force"])
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "sft"]


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    assert export.cli([str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "manifest.json").write_text(json.dumps({"status": "running"}))
    assert export.cli([str(tmp_path / "half"), "--out", str(tmp_path / "x")]) == 2
    assert "did not complete" in capsys.readouterr().err


class FakeHfApi:
    calls = []

    def __init__(self, token=None):
        FakeHfApi.calls.append(("init", token))

    def create_repo(self, **kw):
        FakeHfApi.calls.append(("create_repo", kw))

    def upload_folder(self, **kw):
        FakeHfApi.calls.append(("upload_folder", kw))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kw['repo_id']}/commit/abc"})()


def test_push_to_hub_uploads_the_export_with_the_environment_token(tiny_llama, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    secret = "hf_" + "x" * 30
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    run = make_adapter_output(tiny_llama, tmp_path / "sft", lora())
    out = export.main([str(run), "--out", str(tmp_path / "exported"), "--push-to-hub", "me/tiny", "--private"])
    assert FakeHfApi.calls[0] == ("init", secret)
    assert FakeHfApi.calls[1] == ("create_repo", {"repo_id": "me/tiny", "repo_type": "model", "private": True,
                                                  "exist_ok": True})
    upload = FakeHfApi.calls[2][1]
    assert upload["folder_path"] == str(out) and upload["repo_id"] == "me/tiny"
    assert "huggingface.co/me/tiny" in capsys.readouterr().out
    assert 'from_pretrained("me/tiny")' in (out / "README.md").read_text()
    for f in out.rglob("*"):  # the token is never written anywhere
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f


def test_push_to_hub_failures_are_one_line_and_keep_the_export(tiny_llama, tmp_path, monkeypatch):
    import huggingface_hub

    run = make_adapter_output(tiny_llama, tmp_path / "sft", lora())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        export.main([str(run), "--out", str(tmp_path / "a"), "--push-to-hub", "me/tiny"])
    assert (tmp_path / "a" / "model.safetensors").is_file()

    class Denied(FakeHfApi):
        def create_repo(self, **kw):
            raise PermissionError("401 Unauthorized\nInvalid credentials")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "HfApi", Denied)
    with pytest.raises(UserError, match="401 Unauthorized Invalid credentials") as e:
        export.main([str(run), "--out", str(tmp_path / "b"), "--push-to-hub", "me/tiny"])
    assert "\n" not in str(e.value) and (tmp_path / "b" / "model.safetensors").is_file()
