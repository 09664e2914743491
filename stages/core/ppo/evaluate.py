"""Held-out evaluation of a policy: mean reward of its responses, and its KL to the reference.

Responses are greedy by default (`eval_do_sample: false`), so before/after numbers are deterministic.
KL to the reference is exact, not sampled: the full-vocabulary KL(policy || reference) at every
position of each held-out response, summed over the response (nats per response), at the sampling
temperature. Under several processes each one takes an equal share of the prompts (padded with a
repeat of the last prompt, dropped from the results) so collective operations stay in step.
"""
from __future__ import annotations

import torch

from . import rollout as R


def _share(n: int, rank: int, world: int) -> tuple[list[int], int]:
    """This process's prompt indices (equal counts on every process) and how many of them are real."""
    per = -(-n // world)
    idx = list(range(rank * per, min(n, (rank + 1) * per)))
    return idx + [n - 1] * (per - len(idx)), len(idx)


@torch.no_grad()
def held_out(trainer, *, role: str = "policy", prompts=None, ids=None) -> dict:
    """{mean_reward, eos_rate, mean_length[, gold_score][, kl_to_reference, kl_per_token]} over the held-out prompts
    (gold_score: the trainer's gold judge, a scorer that is not the training reward, when it has one)."""
    prompts = trainer.eval_prompts if prompts is None else prompts
    ids = trainer.eval_ids if ids is None else ids
    if not prompts:
        return {}
    acc, cfg = trainer.accelerator, trainer.cfg
    trainer.model.eval()
    mine, real = _share(len(prompts), acc.process_index, acc.num_processes)
    rows = []
    bs = cfg.per_device_eval_batch_size
    for s in range(0, len(mine), bs):
        idx = mine[s:s + bs]
        batch, texts, has_eos, lengths = trainer.sample([ids[i] for i in idx], role=role, do_sample=cfg.eval_do_sample)
        raw, _ = trainer.score([prompts[i] for i in idx], texts, has_eos)
        gold_judge = getattr(trainer, "gold", None)
        gold = gold_judge.score([prompts[i] for i in idx], texts) if gold_judge is not None else [0.0] * len(idx)
        kl = torch.zeros_like(raw)
        if role == "policy":
            kl = R.exact_kl(trainer.roles, batch, temperature=cfg.temperature, micro_batch=bs, autocast=acc.autocast)
        for j in range(len(idx)):
            rows.append([float(raw[j]), float(has_eos[j]), float(lengths[j]), float(kl[j]), float(gold[j])])
    rows = rows[:real]
    from accelerate.utils import gather_object

    rows = gather_object(rows) if acc.num_processes > 1 else rows
    t = torch.tensor(rows, dtype=torch.float64)
    out = {"mean_reward": float(t[:, 0].mean()), "eos_rate": float(t[:, 1].mean()), "mean_length": float(t[:, 2].mean()),
           "n_prompts": len(rows)}
    if gold_judge is not None:
        out["gold_score"] = float(t[:, 4].mean())
    if role == "policy":
        out["kl_to_reference"] = float(t[:, 3].mean())
        out["kl_per_token"] = float(t[:, 3].sum() / t[:, 2].sum().clamp(min=1))
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in out.items()}


@torch.no_grad()
def _adapter_kl(model, q, qm, resp, mask, autocast) -> torch.Tensor | None:
    """Per-response full-vocabulary KL(policy || adapters disabled) for a PEFT policy (None for other models)."""
    import contextlib

    from . import losses as L

    if not hasattr(model, "disable_adapter"):
        return None
    width = resp.shape[1]
    ids, am, pos = R.model_inputs(q, qm, resp, mask)

    def logits():
        with (autocast or contextlib.nullcontext)():
            return model(input_ids=ids, attention_mask=am, position_ids=pos).logits[:, -width - 1:-1].float()

    policy = logits()
    with model.disable_adapter():
        reference = logits()
    return L.masked_sum(L.kl_full(policy, reference), mask, dim=-1)


@torch.no_grad()
def greedy_reward(model, tokenizer, prompts, reward, *, max_new_tokens: int, max_prompt_length: int, batch_size: int,
                  device, autocast=None, gold=None) -> dict:
    """Mean reward of greedy responses of a plain (or PEFT) causal LM: GRPO/RLOO's before/after figure.
    With `gold` (a judge that is not the training reward) also its mean score; for a PEFT policy also the KL
    to the adapter-disabled model (the reference) per response."""
    import contextlib

    if not prompts:
        return {}
    ids, _ = R.encode_prompts(tokenizer, prompts, max_prompt_length)
    eos, pad = R.eos_ids(tokenizer, model), tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    rows, kls = [], []
    try:
        for s in range(0, len(ids), batch_size):
            q, qm = R.left_pad(ids[s:s + batch_size], pad, device)
            with (autocast or contextlib.nullcontext)():
                resp = R.generate(model, q, qm, eos=eos, pad_id=pad, max_new_tokens=max_new_tokens, do_sample=False)
            resp, mask, has_eos, lengths = R.cut_at_eos(resp, eos, pad)
            texts = R.response_texts(tokenizer, resp, lengths, has_eos)
            batch_prompts = list(prompts[s:s + batch_size])
            scores = reward.score(batch_prompts, texts)
            golds = gold.score(batch_prompts, texts) if gold is not None else [0.0] * len(texts)
            rows += [[float(v), float(e), float(n), float(g)]
                     for v, e, n, g in zip(scores, has_eos.tolist(), lengths.tolist(), golds)]
            kl = _adapter_kl(model, q, qm, resp, mask, autocast)
            if kl is not None:
                kls += kl.tolist()
    finally:
        model.train(was_training)
    t = torch.tensor(rows, dtype=torch.float64)
    out = {"mean_reward": round(float(t[:, 0].mean()), 6), "eos_rate": round(float(t[:, 1].mean()), 6),
           "mean_length": round(float(t[:, 2].mean()), 6), "n_prompts": len(rows)}
    if gold is not None:
        out["gold_score"] = round(float(t[:, 3].mean()), 6)
    if kls:
        out["kl_to_reference"] = round(sum(kls) / len(kls), 6)
    return out
