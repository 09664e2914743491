"""CPU fast paths give TRL's results: the compact LM head and bf16 frozen weights."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

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


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_compact_lm_head_matches_trls_values_and_gradients(fixture, request):
    path = request.getfixturevalue(fixture)
    torch.manual_seed(0)
    trl_model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=4, target_modules="all-linear"))
    ours = copy.deepcopy(trl_model)
    for m in (trl_model, ours):
        add_fused_lm_head(m.get_base_model(), outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    assert compact_lm_head(ours.get_base_model())
    ids, attn, labels = batch()
    got = ours(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
    want = trl_model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(got.loss, want.loss)
    for f in FIELDS:
        torch.testing.assert_close(getattr(got, f), getattr(want, f), msg=f)
    got.loss.backward()
    want.loss.backward()
    grads = lambda m: {n: p.grad for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    g_ours, g_trl = grads(ours), grads(trl_model)
    assert g_ours.keys() == g_trl.keys() and g_ours
    for n in g_trl:
        torch.testing.assert_close(g_ours[n], g_trl[n], atol=1e-6, rtol=1e-4, msg=n)
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
