"""Bottleneck adapters as a registered PEFT method (stages/core/bottleneck.py): behaviour, save/load, TRL."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from tiny_models import build_model, build_tokenizer

from stages.core.bottleneck import BottleneckConfig, BottleneckLayer, default_target_modules, register

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Hello there! The quick brown fox jumps over the lazy dog.",
         "What is the capital of France? The capital of France is Paris."]
EXPECTED_TARGETS = {
    "llama": ["model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp"],
    "qwen2": ["model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp"],
    "gpt2": ["transformer.h.0.attn", "transformer.h.0.mlp", "transformer.h.1.attn", "transformer.h.1.mlp"],
}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def batch(tok):
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def _base(tok, arch="llama"):
    return build_model(arch, vocab_size=len(tok)).eval()  # eval: GPT-2 has dropout


def _cfg(**kw):
    return BottleneckConfig(task_type="CAUSAL_LM", **{"bottleneck_size": 8, **kw})


@torch.no_grad()
def _logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _train(model, batch, steps=8, lr=1e-2):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_fresh_adapter_is_identity(tok, batch, arch):
    base = _base(tok, arch)
    ref = _logits(base, batch)
    model = get_peft_model(base, _cfg()).eval()
    assert model.targeted_module_names == EXPECTED_TARGETS[arch]
    assert sum(isinstance(m, BottleneckLayer) for m in model.modules()) == 4
    wrapped = model.get_base_model().get_submodule(EXPECTED_TARGETS[arch][2])
    assert isinstance(wrapped, BottleneckLayer) and wrapped.layer_idx == 1  # attributes reach the wrapped module
    assert torch.equal(_logits(model, batch), ref)


@pytest.mark.parametrize("placement,suffixes", [("attn", ("attn",)), ("mlp", ("mlp",)), ("both", ("attn", "mlp"))])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_placement_selects_blocks(tok, arch, placement, suffixes):
    model = get_peft_model(_base(tok, arch), _cfg(placement=placement))
    names = model.targeted_module_names
    assert names == [n for n in EXPECTED_TARGETS[arch] if n.endswith(suffixes)]


def test_only_adapter_params_trainable_and_count(tok):
    base = _base(tok)
    model = get_peft_model(base, _cfg(bottleneck_size=8))
    trainable, total = model.get_nb_trainable_parameters()
    hidden = base.config.hidden_size
    per_module = 2 * hidden * 8 + 8 + hidden  # down (w+b) + up (w+b)
    assert trainable == 4 * per_module
    assert 0 < trainable / total < 0.2
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(".bottleneck_down." in n or ".bottleneck_up." in n for n in grads)
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == trainable
    # reduction_factor alternative: width = hidden // factor
    m2 = get_peft_model(_base(tok), _cfg(reduction_factor=4))
    assert m2.base_model.model.model.layers[0].mlp.bottleneck_down["default"].out_features == hidden // 4


def test_training_changes_only_adapter_and_reduces_loss(tok, batch):
    model = get_peft_model(_base(tok), _cfg(non_linearity="gelu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = _train(model, batch)
    assert losses[-1] < losses[0]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapter_keys = {k for k in before if ".bottleneck_down." in k or ".bottleneck_up." in k}
    assert changed == adapter_keys  # every adapter tensor moved, nothing else did


def test_save_and_reload_identical(tok, batch, tmp_path):
    model = get_peft_model(_base(tok), _cfg(non_linearity="silu"))
    _train(model, batch, steps=4)
    trained = _logits(model, batch)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not any(f.endswith(".bin") for f in files)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 16 and all(".bottleneck_" in k and ".default." not in k for k in keys)

    loaded = PeftModel.from_pretrained(_base(tok), tmp_path).eval()
    assert isinstance(loaded.peft_config["default"], BottleneckConfig)
    assert loaded.peft_config["default"].non_linearity == "silu"
    assert torch.equal(_logits(loaded, batch), trained)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # inference mode by default
    # the same file also loads under another adapter name, next to an existing adapter
    loaded.load_adapter(tmp_path, adapter_name="copy", low_cpu_mem_usage=True)
    loaded.set_adapter("copy")
    assert torch.equal(_logits(loaded, batch), trained)


def test_disable_adapter_gives_base_outputs(tok, batch):
    base = _base(tok, "gpt2")
    ref = _logits(base, batch)
    model = get_peft_model(base, _cfg())
    _train(model, batch, steps=3)
    adapted = _logits(model, batch)
    assert not torch.allclose(adapted, ref)
    with model.disable_adapter():
        assert torch.equal(_logits(model, batch), ref)
    assert torch.equal(_logits(model, batch), adapted)


def test_multiple_named_adapters(tok, batch):
    base = _base(tok)
    ref = _logits(base, batch)
    model = get_peft_model(base, _cfg(init_weights=False))
    out_a = _logits(model, batch)
    model.add_adapter("extra", _cfg(init_weights=False, bottleneck_size=4, placement="mlp"))
    assert torch.equal(_logits(model, batch), out_a)  # adding does not activate
    model.set_adapter("extra")
    out_b = _logits(model, batch)
    assert not torch.allclose(out_b, out_a) and not torch.allclose(out_b, ref)
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(".extra." in n and ".mlp." in n for n in grads)
    model.base_model.set_adapter(["default", "extra"])  # stacked: both applied in order
    stacked = _logits(model, batch)
    assert not torch.allclose(stacked, out_a) and not torch.allclose(stacked, out_b)
    model.set_adapter("default")
    model.delete_adapter("extra")
    assert torch.equal(_logits(model, batch), out_a)


def test_merge_raises_and_unload_restores_base(tok, batch):
    base = _base(tok)
    ref = _logits(base, batch)
    model = get_peft_model(base, _cfg(init_weights=False))
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    unloaded = model.unload()
    assert not any(isinstance(m, BottleneckLayer) for m in unloaded.modules())
    assert torch.equal(_logits(unloaded, batch), ref)


def test_bf16_autocast_and_bf16_model(tok, batch):
    model = get_peft_model(_base(tok), _cfg(init_weights=False))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    base = _base(tok).to(torch.bfloat16)
    ref = _logits(base, batch)
    m16 = get_peft_model(base, _cfg())  # PEFT upcasts adapter weights to fp32 by default
    assert {p.dtype for p in m16.parameters() if p.requires_grad} == {torch.float32}
    assert torch.equal(_logits(m16, batch), ref)
    m16b = get_peft_model(_base(tok).to(torch.bfloat16), _cfg(), autocast_adapter_dtype=False)
    assert {p.dtype for p in m16b.parameters() if p.requires_grad} == {torch.bfloat16}


def test_modules_to_save(tok, batch, tmp_path):
    model = get_peft_model(_base(tok), _cfg(modules_to_save=["lm_head"]))
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head.modules_to_save" in n for n in grads)
    _train(model, batch, steps=2)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_base(tok), tmp_path).eval()
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))


@pytest.mark.parametrize("kwargs,field", [
    ({"bottleneck_size": 0}, "bottleneck_size"),
    ({"bottleneck_size": 2.5}, "bottleneck_size"),
    ({"reduction_factor": 0}, "reduction_factor"),
    ({"placement": "ffn"}, "placement"),
    ({"non_linearity": "swish"}, "non_linearity"),
    ({"dropout": 1.0}, "dropout"),
    ({"scaling": float("nan")}, "scaling"),
])
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BottleneckConfig(**kwargs)


def test_register_is_idempotent():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    register()
    register()
    assert PEFT_TYPE_TO_CONFIG_MAPPING["BOTTLENECK"] is BottleneckConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["BOTTLENECK"].__name__ == "BottleneckModel"
    assert default_target_modules("mlp").endswith("(?:mlp|feed_forward|ffn)")


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_sft_trainer_trains_and_saves_reloadable_adapter(tok, batch, tmp_path, gradient_checkpointing):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=2,
                     learning_rate=1e-2, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                     logging_steps=1, max_length=64, gradient_checkpointing=gradient_checkpointing,
                     # reentrant checkpointing is the path that needs enable_input_require_grads()
                     gradient_checkpointing_kwargs={"use_reentrant": True} if gradient_checkpointing else None)
    trainer = SFTTrainer(model=_base(tok), args=args, train_dataset=Dataset.from_dict({"text": TEXTS * 4}),
                         processing_class=tok, peft_config=_cfg())
    model = trainer.model
    assert isinstance(model, PeftModel) and isinstance(model.peft_config["default"], BottleneckConfig)
    before = {k: v.clone() for k, v in model.state_dict().items() if "bottleneck_up" in k}
    trainer.train()  # the Trainer switches checkpointing on at train() time
    assert model.get_base_model().is_activation_checkpointing == gradient_checkpointing
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
    out_dir = tmp_path / "adapter"
    trainer.save_model(str(out_dir))
    assert (out_dir / "adapter_model.safetensors").exists() and (out_dir / "adapter_config.json").exists()
    model.eval()
    loaded = PeftModel.from_pretrained(_base(tok), out_dir).eval()
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))


def test_dpo_trainer_uses_disabled_adapter_as_reference(tok, tmp_path):
    """DPOTrainer without ref_model scores the reference via `disable_adapter()`; with an identity-initialised
    adapter the policy equals the reference at step 1 (loss = ln 2), and the rewards move after one update."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_dict({"prompt": ["What is the capital of France?"] * 4,
                              "chosen": [" Paris."] * 4, "rejected": [" Berlin."] * 4})
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=2, per_device_train_batch_size=2,
                     learning_rate=1e-2, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                     logging_steps=1, gradient_checkpointing=True,
                     gradient_checkpointing_kwargs={"use_reentrant": True})
    trainer = DPOTrainer(model=_base(tok), args=args, train_dataset=data, processing_class=tok, peft_config=_cfg())
    assert trainer.ref_model is None and isinstance(trainer.model, PeftModel)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert logs[1]["rewards/margins"] != 0
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


_RELOAD = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
{maybe_import}
base = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
ids = torch.load(sys.argv[3])
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[4])
"""


def _run(code: str, *argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_reload_in_fresh_process(tiny_llama, batch, tmp_path):
    """A fresh interpreter reloads the adapter after importing stages.core.bottleneck; without the import PEFT does
    not know the BOTTLENECK type and fails with KeyError: 'BOTTLENECK' (the registry lives in the process)."""
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), _cfg(init_weights=False)).eval()
    model.save_pretrained(tmp_path / "adapter")
    ids = batch["input_ids"]
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    ok = _run(_RELOAD.format(maybe_import="import stages.core.bottleneck"),
              tiny_llama, tmp_path / "adapter", tmp_path / "ids.pt", tmp_path / "out.pt")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)

    missing = _run(_RELOAD.format(maybe_import=""),
                   tiny_llama, tmp_path / "adapter", tmp_path / "ids.pt", tmp_path / "out2.pt")
    assert missing.returncode != 0
    assert "KeyError: 'BOTTLENECK'" in missing.stderr
