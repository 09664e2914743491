"""CPU fast paths give TRL's results: the compact LM head and bf16 frozen weights."""
import copy
import dataclasses
import inspect
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

from stages.core import fastpath
from stages.core.fastpath import bf16_frozen_weights, compact_lm_head

FIELDS = ("log_probs", "entropy", "mean_logits", "is_top1", "label_mask")


def batch(vocab=400):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (3, 11), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[2, 8:] = -100  # and padding
    mask = (labels != -100) | (torch.arange(11) < 4)
    mask[2, 8:] = False
    return ids, mask.long(), labels


@pytest.mark.parametrize("fixture, bf16", [("tiny_llama", False), ("tiny_qwen2", False), ("tiny_llama", True),
                                            ("tiny_qwen2", True)])
def test_compact_lm_head_matches_trls_values_and_gradients(fixture, bf16, request):
    path = request.getfixturevalue(fixture)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    # bf16: both run the LM head in bf16 but tile/reduce differently, so agree to bf16 precision only
    tol = dict(atol=3e-2, rtol=3e-2) if bf16 else {}
    gtol = dict(atol=3e-3, rtol=5e-2) if bf16 else dict(atol=1e-6, rtol=1e-4)
    torch.manual_seed(0)
    trl_model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=4, target_modules="all-linear"))
    ours = copy.deepcopy(trl_model)
    for m in (trl_model, ours):
        add_fused_lm_head(m.get_base_model(), outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    assert compact_lm_head(ours.get_base_model())
    ids, attn, labels = batch()
    with autocast:
        got = ours(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
        want = trl_model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(got.loss, want.loss, **tol)
    for f in FIELDS:
        if f == "is_top1" and bf16:  # a near-tie can flip under bf16 rounding
            assert (got.is_top1 == want.is_top1).float().mean() >= 0.9
            continue
        torch.testing.assert_close(getattr(got, f), getattr(want, f), msg=f, **tol)
    got.loss.backward()
    want.loss.backward()
    grads = lambda m: {n: p.grad for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    g_ours, g_trl = grads(ours), grads(trl_model)
    assert g_ours.keys() == g_trl.keys() and g_ours
    for n in g_trl:
        torch.testing.assert_close(g_ours[n], g_trl[n], msg=n, **gtol)
    plain = ours(input_ids=ids, attention_mask=attn)  # without fused_lm_head: the model's own forward
    assert plain.logits.shape == (3, 11, 400)


def test_bf16_frozen_weights_casts_only_frozen_linears_and_keeps_autocast_results(tiny_llama):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=4, target_modules="all-linear"))
    ids, attn, _ = batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=ids, attention_mask=attn).logits.float()
    n = bf16_frozen_weights(model.get_base_model())
    assert n == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.dtype == torch.float32 and p.requires_grad, name
        elif "base_layer" in name and name.endswith("weight"):
            assert p.dtype == torch.bfloat16, name
    assert model.get_base_model().get_output_embeddings().weight.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        after = model(input_ids=ids, attention_mask=attn).logits.float()
    torch.testing.assert_close(after, before)
    with torch.no_grad():  # outside autocast (e.g. generation in a callback) it still runs, in fp32 out
        plain = model(input_ids=ids, attention_mask=attn).logits
    assert plain.dtype == torch.float32 and torch.allclose(plain, before, atol=0.05)


@pytest.mark.skipif(not fastpath._file_mappings(), reason="needs /proc/self/maps (Linux)")
def test_bf16_frozen_weights_releases_the_memory_mapped_weights_file(tiny_qwen2):
    """The fp32 tensors transformers loads are views of the mapped safetensors file; after the cast none
    may point into it, or every page the cast read stays resident (0.4 GB on SmolLM2-135M)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2)  # tied embeddings, like SmolLM2
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    base = model.get_base_model()

    def mapped():
        ranges = fastpath._file_mappings()
        return [n for n, t in [*base.named_parameters(), *base.named_buffers()]
                if any(a <= t.untyped_storage().data_ptr() < b for a, b in ranges)]

    assert mapped(), "precondition: transformers maps the weights file"
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    ids, attn, _ = batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=ids, attention_mask=attn).logits.float()
    bf16_frozen_weights(base)
    assert mapped() == []
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight  # still tied
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(model(input_ids=ids, attention_mask=attn).logits.float(), before)


def _patched(path, outputs=("log_probs", "entropy", "mean_logits", "is_top1")):
    model = AutoModelForCausalLM.from_pretrained(path)
    add_fused_lm_head(model, outputs=outputs)
    return model


def test_compact_lm_head_keeps_the_forward_signature(tiny_llama):
    """generate() builds position_ids / logits_to_keep from the forward's signature."""
    model = _patched(tiny_llama)
    original = inspect.signature(AutoModelForCausalLM.from_pretrained(tiny_llama).forward)
    assert compact_lm_head(model)
    assert inspect.signature(model.forward) == original
    assert {"position_ids", "logits_to_keep"} <= set(inspect.signature(model.forward).parameters)


def test_compact_lm_head_steps_aside_for_fields_it_does_not_compute(tiny_llama):
    """DPO with use_weighting asks TRL for log_sum_sq_probs: TRL's forward must stay and compute it."""
    model = _patched(tiny_llama, outputs=("log_probs", "log_sum_sq_probs"))
    assert not compact_lm_head(model)
    ids, attn, labels = batch()
    out = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
    assert out.log_sum_sq_probs is not None
    # log(sum p^2) by hand from the full logits, at a labelled position
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    want = (2 * logits.log_softmax(-1)).logsumexp(-1)
    mask = labels[:, 1:] != -100
    torch.testing.assert_close(out.log_sum_sq_probs[mask], want[mask].detach(), atol=1e-5, rtol=1e-4)


def test_compact_lm_head_leaves_unrequested_fields_none_as_trl_does(tiny_llama):
    model = _patched(tiny_llama, outputs=("log_probs", "is_top1"))
    assert compact_lm_head(model)
    ids, attn, labels = batch()
    out = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
    assert out.entropy is None and out.mean_logits is None and out.is_top1 is not None


def test_compact_lm_head_calls_trl_for_output_flags(tiny_llama):
    model = _patched(tiny_llama)
    assert compact_lm_head(model)
    ids, attn, labels = batch()
    plain = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
    flagged = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True, output_hidden_states=True)
    torch.testing.assert_close(flagged.log_probs, plain.log_probs, atol=1e-5, rtol=1e-4)


def test_patches_that_find_nothing_to_patch_say_so(tiny_llama, caplog):
    with caplog.at_level(logging.INFO, logger="stages.core.fastpath"):
        with fastpath.during_init(dict, bf16=False):  # a class whose modules hold no TRL
            pass
        assert not compact_lm_head(AutoModelForCausalLM.from_pretrained(tiny_llama))  # not TRL-patched
    text = caplog.text
    assert "no add_fused_lm_head" in text and "not TRL's fused LM head" in text


def test_trl_internals_the_fast_path_relies_on():
    """Fails when TRL changes what stages/core/fastpath.py patches or reads."""
    import trl.trainer.dpo_trainer as dpo
    import trl.trainer.sft_trainer as sft
    from trl import DPOTrainer, SFTTrainer
    from trl.trainer import utils

    # during_init swaps the module-level add_fused_lm_head that the SFT and DPO trainers call
    assert dpo.add_fused_lm_head is utils.add_fused_lm_head and sft.add_fused_lm_head is utils.add_fused_lm_head
    assert DPOTrainer.__module__ == dpo.__name__ and SFTTrainer.__module__ == sft.__name__
    params = list(inspect.signature(utils.add_fused_lm_head).parameters)
    assert params == ["model", "temperature", "cast_lm_head_to_fp32", "outputs"]
    fields = {f.name for f in dataclasses.fields(utils.FusedCausalLMOutput)}
    assert fields == {"loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask",
                      "aux_loss"}
    assert set(fastpath.COMPUTED) < fields


def test_trl_patched_forward_internals(tiny_llama):
    model = _patched(tiny_llama, outputs=("log_probs", "entropy"))
    # trl_request reads add_fused_lm_head's arguments from the patched forward's closure
    assert fastpath.trl_request(model.forward) == {"outputs": ("log_probs", "entropy"), "temperature": 1.0,
                                                   "cast_lm_head_to_fp32": False}
    own = inspect.signature(model.forward.__func__, follow_wrapped=False).parameters
    assert list(own)[:1] == ["self"] and {"fused_lm_head", "labels", "shift_labels", "num_items_in_batch"} <= set(own)


@pytest.mark.parametrize("bf16", [False, True])
def test_chunked_head_equals_full_logits_in_values_and_gradients_of_hidden_and_head(bf16):
    """Tiles of 3 positions (so several tiles and a ragged last one) give what one [tokens x vocab] pass
    gives, including the gradient of a trainable (e.g. full fine-tuning or tied) head weight."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    target = torch.randint(0, 50, (10,), generator=g)
    upstream = torch.rand(10, generator=g)  # a per-token weighting, as DPO's sums give
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        picked, extra = fastpath.chunked_log_probs(hidden, weight, target, chunk=3)
    (picked * upstream).sum().backward()
    got = (picked.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    cast = (lambda x: x.bfloat16().float()) if bf16 else (lambda x: x)  # noqa: E731
    logp = (cast(hidden) @ cast(weight).T).log_softmax(-1)
    want_picked = logp.gather(-1, target[:, None]).squeeze(-1)
    (want_picked * upstream).sum().backward()
    tol = dict(atol=2e-2, rtol=2e-2) if bf16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], want_picked.detach(), **tol)
    torch.testing.assert_close(got[1], hidden.grad, **tol)
    torch.testing.assert_close(got[2], weight.grad, **tol)
    torch.testing.assert_close(extra["entropy"], -(logp.exp() * logp).sum(-1).detach(), **tol)
    assert torch.equal(extra["is_top1"], logp.argmax(-1) == target) or bf16


def test_chunked_head_in_one_tile_gives_the_bf16_head_values_bit_for_bit():
    """One tile: the same bf16 matmul as a plain bf16 head, its softmax read in fp32, so the values are equal."""
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(12, 16, generator=g), torch.randn(50, 16, generator=g)
    target = torch.randint(0, 50, (12,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        picked, extra = fastpath.chunked_log_probs(hidden, weight, target, chunk=64)
    logp = (hidden.bfloat16() @ weight.bfloat16().T).float().log_softmax(-1)
    assert torch.equal(picked, logp.gather(-1, target[:, None]).squeeze(-1))
    assert torch.equal(extra["is_top1"], logp.argmax(-1) == target)


def test_chunked_head_backward_twice_and_mixed_dtypes_without_autocast():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(10, 16, generator=g, requires_grad=True)
    weight, target = torch.randn(50, 16, generator=g), torch.randint(0, 50, (10,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        picked, _ = fastpath.chunked_log_probs(hidden, weight, target, chunk=4)
    picked.sum().backward(retain_graph=True)  # the head copy made for the first backward is released by it
    first = hidden.grad.clone()
    hidden.grad = None
    picked.sum().backward()
    torch.testing.assert_close(hidden.grad, first, rtol=0, atol=0)
    # no autocast: a bf16 hidden state against an fp32 head is computed in the hidden state's dtype
    h16 = hidden.detach().bfloat16().requires_grad_()
    picked16, _ = fastpath.chunked_log_probs(h16, weight, target, chunk=4)
    picked16.sum().backward()
    assert h16.grad.dtype == torch.bfloat16 and torch.isfinite(picked16).all()


def test_compact_lm_head_steps_aside_when_rebound_to_another_module(tiny_llama):
    """PEFT's disable_adapter for prompt tuning sets PeftModel.forward to the base model's forward and
    accelerate re-binds that function to the PeftModel: the compact path must then hand over to TRL's forward."""
    import types

    model = _patched(tiny_llama)
    assert compact_lm_head(model)
    ids, attn, labels = batch()
    want = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
    holder = torch.nn.Module()  # like a PeftModel: its base_model is the whole causal LM
    holder.base_model = model
    rebound = types.MethodType(model.forward.__func__, holder)
    got = rebound(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(got.log_probs, want.log_probs, atol=1e-5, rtol=1e-4)
