"""The PPO loop (InstructGPT-style RLHF), on accelerate so `accelerate launch` DDP/DeepSpeed runs it.

One update: sample responses for `rollout_batch_size` prompts → score them (reward model / rules, minus
a penalty for a missing EOS) → per-token rewards = score at the last response token − kl_coef · KL to
the reference → GAE advantages and returns → `num_ppo_epochs` passes of clipped policy + value losses
over shuffled minibatches with gradient accumulation → KL coefficient update (fixed or adaptive).
Every update is logged (stdout, TensorBoard, history); checkpoints follow save_strategy/save_steps.
Guards (guards.py): every `gold_eval_steps` updates a held-out evaluation adds heldout_reward, gold_score,
kl_to_reference and response_length to the update's entry; the best one by the gold score is kept as the
`best-gold` checkpoint and restored at the end; training stops early on a falling gold score with a rising
reward (`gold_patience`) or past `max_kl`; scores can be normalised against, and penalised for drifting in
length from, the starting policy's first rollouts.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch

from . import checkpoint as C
from . import engines as E
from . import guards as G
from . import losses as L
from . import rollout as R
from .evaluate import held_out


def make_accelerator(cfg):
    from accelerate import Accelerator

    mp = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no"
    acc = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=mp)
    ds = getattr(acc.state, "deepspeed_plugin", None)
    if ds is not None:  # no dataloader to infer "auto" batch sizes from: fill them in
        conf = ds.deepspeed_config
        conf["train_micro_batch_size_per_gpu"] = cfg.per_device_train_batch_size
        conf["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
        conf["train_batch_size"] = cfg.minibatch_size * acc.num_processes
        if conf.get("gradient_clipping") == "auto":
            conf["gradient_clipping"] = cfg.max_grad_norm
    return acc


def disable_dropout(model) -> None:
    """PPO ratios need deterministic forward passes: every dropout off, train mode kept for checkpointing."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        cfg = getattr(m, "config", None)
        for key in ("attention_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "dropout"):
            if cfg is not None and isinstance(getattr(cfg, key, None), float):
                setattr(cfg, key, 0.0)


@contextlib.contextmanager
def _gathered_zero3(engine):
    """ZeRO-3: gather the sharded parameters once for the whole generation, with the per-module hooks off."""
    import deepspeed

    try:
        from trl.models.utils import add_hooks, remove_hooks
    except ImportError:  # pragma: no cover - correct without it, only slower
        add_hooks = remove_hooks = None
    with deepspeed.zero.GatheredParameters(list(engine.parameters())):
        if remove_hooks:
            remove_hooks(engine)
        try:
            yield
        finally:
            if add_hooks:
                add_hooks(engine)


BEST = "best-gold"  # the checkpoint of the best policy by the gold score (never rotated)


class PPOTrainer:
    def __init__(self, cfg, roles, tokenizer, reward, train_prompts, eval_prompts, *, accelerator, checkpoints: Path,
                 logs: Path | None = None, fingerprint: str | None = None, callbacks=(), log=print, gold=None,
                 engine=None):
        from transformers import get_scheduler

        self.cfg, self.roles, self.tokenizer, self.reward, self.gold = cfg, roles, tokenizer, reward, gold
        self.tracker = G.GoldTracker(patience=cfg.gold_patience)
        self.start_stats: dict | None = None  # the starting policy's score mean/std and length (guards)
        self.start_eval: dict | None = None  # the stage's own evaluation of the starting policy, reused at update 0
        self.stopped: str | None = None
        self.selected_step: int | None = None  # the update whose policy is the output, when chosen by the gold score
        self.accelerator, self.checkpoints, self.fingerprint = accelerator, Path(checkpoints), fingerprint
        self.callbacks, self.log = list(callbacks), log
        self.engine = engine or E.GenerateEngine()  # who generates rollouts (engines.py); adapters follow self.update
        self.actor_critic = roles.actor_critic
        self.device = accelerator.device
        self.pad_id = tokenizer.pad_token_id
        self.train_prompts = list(train_prompts)
        self.train_ids, self.prompt_lengths = R.encode_prompts(tokenizer, self.train_prompts, cfg.max_prompt_length)
        self.eval_prompts = list(eval_prompts or [])
        self.eval_ids, _ = R.encode_prompts(tokenizer, self.eval_prompts, cfg.max_prompt_length)
        self.eos = R.eos_ids(tokenizer, self.actor_critic.lm)
        disable_dropout(self.actor_critic)
        if roles.reference is not None:
            disable_dropout(roles.reference)
        if cfg.gradient_checkpointing:
            self.actor_critic.enable_checkpointing()
        self.world = accelerator.num_processes
        self.global_batch = cfg.rollout_batch_size * self.world
        n = len(self.train_prompts)
        self.total_updates = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * n / self.global_batch))
        steps = self.total_updates * cfg.num_ppo_epochs * (cfg.rollout_batch_size // cfg.minibatch_size)
        params = [p for p in self.actor_critic.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                weight_decay=cfg.weight_decay)
        # on the torch optimizer itself: DeepSpeed's ZeRO optimizers step it with its param_groups' lr
        self.scheduler = get_scheduler(cfg.lr_scheduler_type, opt, num_warmup_steps=cfg.get_warmup_steps(steps),
                                       num_training_steps=steps)
        self.model, self.optimizer = accelerator.prepare(self.actor_critic, opt)
        if roles.reference is not None:  # DeepSpeed may cast the trained weights (bf16): the reference must match
            dtype = next(self.actor_critic.lm.parameters()).dtype  # (parameters only: RoPE buffers stay fp32)
            for p in roles.reference.parameters():
                p.data = p.data.to(dtype)
        self.kl = L.KLController(cfg.kl_coef, cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon)
        self.update, self.history = 0, []
        self.writer = None
        if logs is not None and accelerator.is_main_process and "tensorboard" in (cfg.report_to or []):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(logs))

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"update": self.update, "total_updates": self.total_updates, "kl_coef": self.kl.value,
                "history": self.history, "fingerprint": self.fingerprint, "gold": self.tracker.state_dict(),
                "start_stats": self.start_stats}

    def resume(self, path) -> None:
        state = C.load(self, path)
        self.engine.invalidate()  # the rollout engine must serve the loaded weights, not the last ones it synced
        if self.fingerprint and state.get("fingerprint") not in (None, self.fingerprint):
            self.log(f"warning: {path} was written with a different config or data; continuing from it anyway")
        self.update, self.history = int(state["update"]), list(state.get("history", []))
        self.kl.load_state_dict({"value": state["kl_coef"]})
        self.tracker.load_state_dict(state.get("gold"))
        self.start_stats = state.get("start_stats")

    # -- generation ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def generator(self, role: str = "policy"):
        """The model that generates for a role ("policy" or "reference"); under DeepSpeed ZeRO-3 the
        trained module's parameters are gathered once for the whole generation."""
        if role == "reference" and self.roles.reference is not None:  # full mode: a separate frozen model
            yield self.roles.reference
            return
        ds = getattr(self.accelerator.state, "deepspeed_plugin", None)
        ctx = _gathered_zero3(self.model) if ds is not None and ds.zero_stage == 3 else contextlib.nullcontext()
        with ctx:
            unwrapped = self.accelerator.unwrap_model(self.model)
            with unwrapped.use(role):  # PEFT mode: "reference" = adapters disabled
                yield unwrapped.lm

    def sample(self, ids: list[list[int]], *, role="policy", do_sample=True):
        cfg = self.cfg
        q, qm = R.left_pad(ids, self.pad_id, self.device)
        with self.generator(role) as gen, self.accelerator.autocast():
            sampling = E.Sampling(max_new_tokens=cfg.max_new_tokens, eos=tuple(self.eos), pad_id=self.pad_id,
                                  do_sample=do_sample, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
            resp = self.engine.generate(gen, q, qm, ids, sampling, role=role, version=self.update)
        resp, mask, has_eos, lengths = R.cut_at_eos(resp, self.eos, self.pad_id)
        texts = R.response_texts(self.tokenizer, resp, lengths, has_eos)
        return {"query": q, "query_mask": qm, "response": resp, "mask": mask}, texts, has_eos, lengths

    def score(self, prompts, texts, has_eos, lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), self.accelerator.autocast():
            raw = torch.tensor(self.reward.score(prompts, texts), dtype=torch.float32, device=self.device)
        cfg = self.cfg
        if lengths is not None and (cfg.reward_normalization != "none" or cfg.length_penalty):
            if self.start_stats is None:  # the first rollouts come from the starting (SFT) policy itself
                all_raw = self.accelerator.gather(raw.float())
                all_len = self.accelerator.gather(lengths.to(self.device).float())
                self.start_stats = G.start_statistics(all_raw, all_len)
                self.log(f"starting policy's rollouts: score mean {self.start_stats['mean']:.4f}, std "
                         f"{self.start_stats['std']:.4f}, length {self.start_stats['length']:.1f} tokens (guards' reference)")
            scores = G.shape_scores(raw, lengths.to(self.device), self.start_stats, normalization=cfg.reward_normalization,
                                    length_penalty=cfg.length_penalty)
        else:
            scores = raw.clone()
        if self.cfg.missing_eos_penalty:
            scores = scores - self.cfg.missing_eos_penalty * (~has_eos).float()
        if self.cfg.score_clip:
            scores = scores.clamp(-self.cfg.score_clip, self.cfg.score_clip)
        return raw, scores

    # -- one update ------------------------------------------------------------------------------------
    def prompt_indices(self, update: int) -> list[int]:
        """This process's prompts for an update: a reproducible stream of per-epoch permutations (resume-safe)."""
        n, out = len(self.train_prompts), []
        start = update * self.global_batch + self.accelerator.process_index * self.cfg.rollout_batch_size
        for i in range(start, start + self.cfg.rollout_batch_size):
            epoch, pos = divmod(i, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
            out.append(int(perm[pos]))
        return out

    def rollout(self, idx: list[int]) -> tuple[dict, dict]:
        cfg, t0 = self.cfg, time.perf_counter()
        self.model.eval()
        prompts = [self.train_prompts[i] for i in idx]
        batch, texts, has_eos, lengths = self.sample([self.train_ids[i] for i in idx])
        gen_s = time.perf_counter() - t0
        raw, scores = self.score(prompts, texts, has_eos, lengths)
        batch.update(R.score_tokens(self.roles, batch, temperature=cfg.temperature, micro_batch=cfg.per_device_train_batch_size,
                                    autocast=self.accelerator.autocast))
        mask = batch["mask"]
        rewards, kl = L.per_token_rewards(scores, batch["logprobs"], batch["ref_logprobs"], mask, self.kl.value, cfg.kl_estimator)
        if cfg.whiten_rewards:
            rewards = L.masked_whiten(rewards, mask, shift_mean=False)
        adv, returns = L.gae(rewards, batch["values"], mask, cfg.gamma, cfg.lam)
        batch["advantages"], batch["returns"] = L.masked_whiten(adv, mask), returns
        kl_seq = kl.sum(-1)
        stats = {"objective/score": raw.mean(), "objective/kl": kl_seq.mean(),
                 "objective/kl_k3": L.kl_k3(batch["logprobs"], batch["ref_logprobs"]).mul(mask).sum(-1).mean(),
                 "objective/reward": (scores - self.kl.value * kl_seq).mean(),
                 "objective/entropy": L.masked_mean(batch["entropy"], mask), "response/length": lengths.float().mean(),
                 "response/eos_rate": has_eos.float().mean(), "value/mean": L.masked_mean(batch["values"], mask)}
        return batch, {k: v.detach().float() for k, v in stats.items()} | {"_gen_tokens": mask.sum(), "_gen_s": gen_s}

    def optimise(self, batch: dict, update: int) -> dict:
        cfg, acc = self.cfg, self.accelerator
        self.model.train()
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + update)
        sums, count, tokens = {}, 0, 0
        for _ in range(cfg.num_ppo_epochs):
            perm = torch.randperm(cfg.rollout_batch_size, generator=g).to(self.device)
            for s in range(0, cfg.rollout_batch_size, cfg.per_device_train_batch_size):
                b = R.trim(batch, perm[s:s + cfg.per_device_train_batch_size])
                width = b["response"].shape[1]
                ids, mask, pos = R.model_inputs(b["query"], b["query_mask"], b["response"], b["mask"])
                with acc.accumulate(self.model):
                    with acc.autocast():
                        logits, values = self.model(ids, mask, pos, width)
                    logp = L.logprobs_from_logits(logits.float() / cfg.temperature, b["response"])
                    pg, pstats = L.policy_loss(logp, b["logprobs"], b["advantages"], b["mask"], cfg.cliprange)
                    vf, vstats = L.value_loss(values, b["values"], b["returns"], b["mask"], cfg.cliprange_value)
                    acc.backward(pg + cfg.vf_coef * vf)
                    if acc.sync_gradients and cfg.max_grad_norm:
                        acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                if acc.sync_gradients:
                    self.scheduler.step()
                for k, v in {"loss/policy": pg, "loss/value": vf, "policy/clipfrac": pstats["clipfrac"],
                             "policy/approx_kl": pstats["approx_kl"], "value/clipfrac": vstats["vf_clipfrac"]}.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
                count, tokens = count + 1, tokens + int(mask.sum())
        out = {k: v / count for k, v in sums.items()}
        out["_train_tokens"] = torch.tensor(float(tokens), device=self.device)
        return out

    def _reduce(self, stats: dict) -> dict:
        keys = sorted(k for k in stats if not k.startswith("_"))
        vals = self.accelerator.reduce(torch.stack([torch.as_tensor(stats[k], device=self.device).float() for k in keys]), "mean")
        return {k: round(float(v), 6) for k, v in zip(keys, vals)}

    # -- the loop ----------------------------------------------------------------------------------------
    def train(self, resume_from: str | None = None) -> list[dict]:
        cfg = self.cfg
        if resume_from:
            self.resume(resume_from)
            self.log(f"resumed from {resume_from}: update {self.update}/{self.total_updates}")
        n = len(self.train_prompts)
        if self.cfg.gold_eval_steps and self.eval_prompts and self.update == 0 and not self.history:
            self.gold_evaluation(self.start_eval or self.evaluate(role="policy"), entry={"step": 0})
        while self.update < self.total_updates and self.stopped is None:
            u = self.update
            batch, rstats = self.rollout(self.prompt_indices(u))
            t0 = time.perf_counter()
            ostats = self.optimise(batch, u)
            train_s = time.perf_counter() - t0
            logs = self._reduce(rstats | ostats)
            gen_tok = float(self.accelerator.reduce(rstats["_gen_tokens"].float(), "sum"))
            train_tok = float(self.accelerator.reduce(ostats["_train_tokens"], "sum"))
            logs.update({"step": u + 1, "kl_coef": self.kl.value, "learning_rate": self.scheduler.get_last_lr()[0],
                         "gen_tokens_per_second": round(gen_tok / max(rstats["_gen_s"], 1e-9), 1),
                         "train_tokens_per_second": round(train_tok / max(train_s, 1e-9), 1)})
            self.kl.update(logs["objective/kl"], self.global_batch)
            self.update = u + 1
            self.kl_guard(logs)
            epoch_end = (self.update * self.global_batch) // n > (u * self.global_batch) // n
            if self.update < self.total_updates and self._due(cfg.eval_strategy, cfg.eval_steps, epoch_end) and self.eval_prompts:
                logs.update({f"eval/{k}": v for k, v in self.evaluate().items()})
            last = self.update == self.total_updates
            if cfg.gold_eval_steps and self.eval_prompts and (self.update % cfg.gold_eval_steps == 0 or last or self.stopped):
                self.gold_evaluation(self.evaluate(), entry=logs)
            self.history.append(logs)
            self._report(logs)
            last = self.update == self.total_updates
            if self._due(cfg.save_strategy, cfg.save_steps, epoch_end) or (last and str(getattr(cfg.save_strategy, "value", cfg.save_strategy)) != "no"):
                C.save(self, self.checkpoints, cfg.save_total_limit)
            for cb in self.callbacks:
                if hasattr(cb, "on_update_end"):
                    cb.on_update_end(self, self.update, logs)
        if self.stopped:
            self.log(f"stopped early after update {self.update}/{self.total_updates}: {self.stopped}")
        self.restore_best()
        if self.writer is not None:
            self.writer.flush()
        return self.history

    # -- guards ----------------------------------------------------------------------------------------
    @property
    def tracking_gold(self) -> bool:
        return bool(self.gold is not None and self.cfg.gold_eval_steps and self.eval_prompts)

    def gold_evaluation(self, held: dict, entry: dict) -> None:
        """Add the agreed held-out names to `entry` (a log-history entry); with a gold judge, keep the best policy."""
        entry.update(G.eval_entry(entry["step"], held))
        if self.update == 0:
            entry.setdefault("kl_to_reference", 0.0)  # the starting policy is the reference
            self.history.append(entry)
        self.log(f"held-out at update {entry['step']}: reward {entry.get('heldout_reward', float('nan')):.4f}"
                 + (f", gold {entry['gold_score']:.4f}" if "gold_score" in entry else "")
                 + f", KL {entry.get('kl_to_reference', 0.0):.3f}, length {entry.get('response_length', 0.0):.1f}")
        if "gold_score" not in entry or not self.tracking_gold:
            return
        if self.tracker.observe(entry) and self.cfg.gold_select_best:
            C.save(self, self.checkpoints, name=BEST)
        if self.tracker.should_stop and self.cfg.gold_patience and self.stopped is None:
            self.stopped = self.tracker.stopped

    def kl_guard(self, logs: dict) -> None:
        """Past `max_kl` (rollout KL per response): stop, or raise the KL coefficient by half."""
        cfg = self.cfg
        if cfg.max_kl is None or not logs["objective/kl"] > cfg.max_kl:
            return
        if cfg.max_kl_action == "stop":
            self.stopped = f"KL to the reference {logs['objective/kl']:.3f} passed max_kl {cfg.max_kl:g}"
        else:
            self.kl.value *= 1.5
            logs["kl_coef"] = self.kl.value
            self.log(f"KL {logs['objective/kl']:.3f} passed max_kl {cfg.max_kl:g}: kl_coef raised to {self.kl.value:.4g}")

    def restore_best(self) -> None:
        """The output is the best policy by the gold score (the start included), not the last one."""
        best = self.tracker.best
        if not (self.tracking_gold and self.cfg.gold_select_best and best is not None):
            return
        path = self.checkpoints / BEST
        if best["step"] != self.update:
            import json

            saved = json.loads((path / C.STATE).read_text()).get("update") if (path / C.STATE).is_file() else None
            if saved != best["step"]:  # missing, or left by an interrupted run past the checkpoint resumed from
                self.log(f"warning: {path} does not hold update {best['step']}: the output is the last policy, "
                         "not the best by the gold score")
                return
            C.load(self, path)
            self.engine.invalidate()  # the rollout engine must serve the loaded weights, not the last ones it synced
            self.log(f"output = the policy of update {best['step']} (best gold score {best['gold_score']:.4f}; "
                     f"last update {self.update})")
        self.selected_step = best["step"]

    def _due(self, strategy, steps, epoch_end: bool) -> bool:
        s = str(getattr(strategy, "value", strategy))
        if s == "steps":
            return bool(steps) and self.update % int(steps) == 0
        return s == "epoch" and epoch_end

    def _report(self, logs: dict) -> None:
        if self.writer is not None:
            for k, v in logs.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, logs["step"])
        self.log(f"update {logs['step']}/{self.total_updates}: reward {logs['objective/reward']:.4f} score "
                 f"{logs['objective/score']:.4f} kl {logs['objective/kl']:.4f} entropy {logs['objective/entropy']:.3f} "
                 f"clipfrac {logs['policy/clipfrac']:.3f} approx_kl {logs['policy/approx_kl']:.4f} value_loss "
                 f"{logs['loss/value']:.4f} length {logs['response/length']:.1f} | generation "
                 f"{logs['gen_tokens_per_second']:.0f} tok/s, training {logs['train_tokens_per_second']:.0f} tok/s")

    def evaluate(self, role: str = "policy") -> dict:
        return held_out(self, role=role)
