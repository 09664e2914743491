"""Rollouts: prompt encoding, batched KV-cache generation, EOS handling, per-token log-probs and values.

Layout of one batch: queries left-padded to width P, responses right-padded to width R; the model sees
[query | response] with an attention mask and position ids counted over real tokens only, so left
padding never shifts positions. A response is cut after its first EOS (kept, and scored); tokens after
it are padding. Log-probs and entropies use logits / temperature, the distribution the sampler draws from.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from . import losses as L


@dataclass
class PromptLengths:
    rows: int = 0
    trimmed: int = 0  # prompts longer than max_prompt_length, trimmed from their start (never dropped)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "trimmed": self.trimmed}


def encode_prompts(tokenizer, prompts: list, max_prompt_length: int) -> tuple[list[list[int]], PromptLengths]:
    """Chat-template each prompt with the generation prompt; over-long ones keep their last tokens
    (the suite's one truncation rule, encode.fit_prompt_response, with no response yet)."""
    from ..encode import fit_prompt_response

    out, report = [], PromptLengths()
    for p in prompts:
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        ids = list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        report.rows += 1
        ids, _, what = fit_prompt_response(ids, [], max_prompt_length)
        report.trimmed += what is not None
        out.append(ids)
    return out, report


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def eos_ids(tokenizer, model=None) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(model, query, query_mask, *, eos: list[int], pad_id: int, max_new_tokens: int, do_sample: bool = True,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Sampled (or greedy) continuations with the KV cache, stopping per row at EOS; returns (B, R) tokens."""
    from transformers import GenerationConfig

    # every sampling knob is set explicitly (top_k 0 = off): never inherit the model's generation_config defaults
    kw = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=None) if do_sample else {}
    gc = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad_id, use_cache=True,
                          do_sample=do_sample, repetition_penalty=1.0, **kw)
    out = model.generate(input_ids=query, attention_mask=query_mask, generation_config=gc)
    return out[:, query.shape[1]:]


def cut_at_eos(response: torch.Tensor, eos: list[int], pad_id: int):
    """Tokens after the first EOS become padding. Returns (response, mask float, has_eos bool, lengths)."""
    is_eos = torch.zeros_like(response, dtype=torch.bool)
    for e in eos:
        is_eos |= response == e
    has_eos = is_eos.any(-1)
    first = torch.where(has_eos, is_eos.float().argmax(-1), torch.full_like(has_eos, response.shape[1], dtype=torch.long))
    lengths = torch.where(has_eos, first + 1, first)
    positions = torch.arange(response.shape[1], device=response.device).unsqueeze(0)
    mask = positions < lengths.unsqueeze(1)
    # rows that never ended: generation padded nothing, but a pad id inside them is still not a token we sampled
    response = torch.where(mask, response, torch.full_like(response, pad_id))
    return response, mask.float(), has_eos, lengths


def response_texts(tokenizer, response: torch.Tensor, lengths: torch.Tensor, has_eos: torch.Tensor) -> list[str]:
    texts = []
    for row, n, e in zip(response.tolist(), lengths.tolist(), has_eos.tolist()):
        texts.append(tokenizer.decode(row[: n - 1 if e else n], skip_special_tokens=True))
    return texts


def model_inputs(query, query_mask, response, response_mask):
    """[query | response] with attention mask and position ids; leading all-pad columns are removed."""
    ids = torch.cat([query, response], 1)
    mask = torch.cat([query_mask.long(), response_mask.long()], 1)
    first = int(mask.any(0).float().argmax())  # the first column any row uses
    ids, mask = ids[:, first:], mask[:, first:]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, position_ids


def trim(batch: dict, idx) -> dict:
    """Rows idx of a rollout batch, response columns cut to the longest real response among them."""
    width = max(1, int(batch["mask"][idx].sum(-1).max()))
    return {k: (v[idx][:, :width] if v.dim() == 2 and k not in ("query", "query_mask") else v[idx])
            for k, v in batch.items()}


@torch.no_grad()
def score_tokens(roles, batch: dict, *, temperature: float, micro_batch: int, autocast=contextlib.nullcontext):
    """Old log-probs, reference log-probs, values and entropies for every response token (micro-batched)."""
    ac = roles.actor_critic
    n = batch["response"].shape[0]
    out = {k: torch.zeros_like(batch["mask"]) for k in ("logprobs", "ref_logprobs", "values", "entropy")}
    for s in range(0, n, micro_batch):
        idx = torch.arange(s, min(s + micro_batch, n), device=batch["response"].device)
        b = trim(batch, idx)
        width = b["response"].shape[1]
        ids, mask, pos = model_inputs(b["query"], b["query_mask"], b["response"], b["mask"])
        with autocast():
            logits = ac.policy_logits(ids, mask, pos, width).float() / temperature
            values = ac.values(ids, mask, pos, width)
            ref = roles.reference_logits(ids, mask, pos, width).float() / temperature
        out["logprobs"][idx, :width] = L.logprobs_from_logits(logits, b["response"])
        out["entropy"][idx, :width] = L.entropy_from_logits(logits)
        out["values"][idx, :width] = values.float()
        out["ref_logprobs"][idx, :width] = L.logprobs_from_logits(ref, b["response"])
        del logits, ref
    for k in out:
        out[k] = out[k] * batch["mask"]
    return out


@torch.no_grad()
def exact_kl(roles, batch: dict, *, temperature: float, micro_batch: int, autocast=contextlib.nullcontext):
    """Sum over each response of the full-vocabulary KL(policy || reference) at every response position."""
    ac, n = roles.actor_critic, batch["response"].shape[0]
    total = torch.zeros(n, device=batch["response"].device)
    for s in range(0, n, micro_batch):
        idx = torch.arange(s, min(s + micro_batch, n), device=batch["response"].device)
        b = trim(batch, idx)
        width = b["response"].shape[1]
        ids, mask, pos = model_inputs(b["query"], b["query_mask"], b["response"], b["mask"])
        with autocast():
            logits = ac.policy_logits(ids, mask, pos, width).float() / temperature
            ref = roles.reference_logits(ids, mask, pos, width).float() / temperature
        total[idx] = L.masked_sum(L.kl_full(logits, ref), b["mask"], dim=-1)
    return total
