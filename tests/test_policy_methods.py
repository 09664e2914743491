"""Every method of the policy builder: only the intended parameters train, and saved adapters reload exactly."""
import pytest
import torch
from datasets import Dataset
from trl import ModelConfig, SFTConfig, SFTTrainer

from stages.core.config import PolicyArguments
from stages.core.encode import encode_sft
from stages.core.policy import build_policy, quantization_config, trainable_summary

ROWS = [{"messages": [{"role": "user", "content": f"Name colour {i}"}, {"role": "assistant", "content": c}]}
        for i, c in enumerate(["red", "green", "blue", "pink", "gold", "grey", "teal", "cyan"])]
ADAPTER_MARKERS = {"lora": ("lora_",), "dora": ("lora_",), "qlora": ("lora_",), "ia3": ("ia3_",),
                   "prefix": ("prompt_encoder",), "prompt": ("prompt_encoder",), "adapters": ("bottleneck",)}


def train_policy(model_dir, method, tmp_path, steps=3):
    targs = SFTConfig(output_dir=str(tmp_path / "ckpt"), max_steps=steps, per_device_train_batch_size=4,
                      learning_rate=5e-2, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                      gradient_checkpointing=False, logging_steps=1, max_length=64)
    margs = ModelConfig(model_name_or_path=str(model_dir), lora_r=4, lora_alpha=8, lora_target_modules=["all-linear"])
    policy = build_policy(margs, PolicyArguments(peft_method=method, num_virtual_tokens=4, adapter_size=8), targs)
    ds, _ = encode_sft(Dataset.from_list(ROWS), policy.tokenizer, max_length=64)
    trainer = SFTTrainer(model=policy.model, args=targs, train_dataset=ds, processing_class=policy.tokenizer,
                         peft_config=policy.peft_config)
    return policy, trainer, ds


def snapshot(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prefix", "prompt", "adapters", "qlora"])
def test_only_adapter_parameters_change_and_adapter_reloads(method, tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if method == "qlora":  # bitsandbytes' CPU 4-bit kernels need in_features >= their 64-wide blocks
        from tiny_models import save_tiny

        tiny_llama = save_tiny(tmp_path / "tiny64", "llama", hidden=64)
    policy, trainer, ds = train_policy(tiny_llama, method, tmp_path)
    model = trainer.model
    s = trainable_summary(model)
    assert 0 < s["trainable_pct"] < 50, s
    before = snapshot(model)
    trainer.train()
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "nothing trained"
    markers = ADAPTER_MARKERS[method]
    assert all(any(m in n for m in markers) for n in changed), sorted(changed)[:5]

    out = tmp_path / "adapter"
    model.save_pretrained(out)
    assert (out / "adapter_model.safetensors").is_file()
    batch = torch.tensor([ds[0]["input_ids"]])
    model.eval()
    # bitsandbytes' CPU 4-bit *inference* kernel repacks weights with bf16 scales; compare on its exact fp32 path
    grad_mode = torch.enable_grad if method == "qlora" else torch.no_grad
    with grad_mode():
        ref = model(input_ids=batch).logits.detach()
    qc = None
    if method == "qlora":
        qc = quantization_config("qlora", PolicyArguments(peft_method="qlora"), ModelConfig(), torch.float32)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=qc, dtype=torch.float32)
    if method == "adapters":
        import stages.core.bottleneck  # noqa: F401
    reloaded = PeftModel.from_pretrained(fresh, out).eval()
    with grad_mode():
        got = reloaded(input_ids=batch).logits.detach()
    if method == "qlora":
        # the adapter itself reloads bit-exactly; bitsandbytes' CPU kernels repack 4-bit weights with bf16
        # scales on first use, so logits agree to bf16 precision only
        trained = {n: p for n, p in model.named_parameters() if "lora_" in n}
        for n, p in reloaded.named_parameters():
            if "lora_" in n:
                assert torch.equal(p.detach(), trained[n].detach()), n
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    else:
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_full_fine_tuning_trains_the_weights(tiny_qwen2, tmp_path):
    policy, trainer, _ = train_policy(tiny_qwen2, "full", tmp_path)
    assert policy.peft_config is None
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(changed) > len(before) // 2
    assert trainable_summary(trainer.model)["trainable_pct"] == 100.0


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_gpt2"])
def test_lora_works_on_other_architectures(fixture, request, tmp_path):
    policy, trainer, _ = train_policy(request.getfixturevalue(fixture), "lora", tmp_path)
    before = snapshot(trainer.model)
    trainer.train()
    changed = [n for n, p in snapshot(trainer.model).items() if not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed)


def test_lora_output_is_merged_when_the_next_stage_loads_it(tiny_llama, tmp_path):
    """The convention: a LoRA SFT output loads as its merged policy, so 'adapters off' == the SFT policy."""
    from transformers import AutoModelForCausalLM

    from stages.core.policy import load_model

    policy, trainer, ds = train_policy(tiny_llama, "lora", tmp_path)
    trainer.train()
    out = tmp_path / "sft"
    trainer.model.save_pretrained(out)
    policy.tokenizer.save_pretrained(out)
    batch = torch.tensor([ds[0]["input_ids"]])
    with torch.no_grad():
        ref = trainer.model.eval()(input_ids=batch).logits
    merged, origin, merged_dir = load_model(str(out))
    assert not hasattr(merged, "peft_config") and merged_dir == str(out.resolve())
    with torch.no_grad():
        got = merged.eval()(input_ids=batch).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=batch).logits, got, atol=1e-4)


def test_sft_lora_output_merges_under_a_reward_model_head(tiny_llama, tmp_path):
    """A reward model can start from a causal-LM SFT LoRA output: the adapter merges into the SEQ_CLS body."""
    from stages.core.policy import load_model

    policy, trainer, ds = train_policy(tiny_llama, "lora", tmp_path)
    trainer.train()
    out = tmp_path / "sft"
    trainer.model.save_pretrained(out)
    policy.tokenizer.save_pretrained(out)
    lm, _, _ = load_model(str(out))
    rm, _, merged = load_model(str(out), task="seq_cls")
    assert merged == str(out.resolve()) and type(rm).__name__.endswith("ForSequenceClassification")
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(rm.state_dict()[name], lm.state_dict()[name])
