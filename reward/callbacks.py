"""A TrainerCallback that measures the preference win rate every N evaluations during training.

    from reward.callbacks import WinRateCallback
    cb = WinRateCallback("demo:prompts", judge="runs/x/rm", every=1, max_prompts=32)
    trainer.add_callback(cb)

At each N-th training evaluation, the model being trained generates for the prompts (identical decoding
for both sides) and is judged against the reference: a model dir (generated once, cached when
`out_dir` is given), or by default the starting policy: adapters disabled for a PEFT model (with a
merged SFT start this is the SFT policy), else the model's own responses at the start of training.
Results go into `state.log_history` (so curves.png draws them), the evaluation's metrics and
`self.history`; with `out_dir`, a full report per evaluation in out_dir/step-N. Runs on the main
process only (not under ZeRO-3, where generation needs every rank).
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict
from pathlib import Path

from transformers import TrainerCallback


class WinRateCallback(TrainerCallback):
    def __init__(self, prompts, judge, *, reference=None, every: int = 1, max_prompts: int | None = None,
                 decoding=None, out_dir=None, n_boot: int = 1000, seed: int = 0, prefix: str = "winrate"):
        from .generate import Decoding

        if every < 1:
            raise ValueError("every must be >= 1")
        self.prompts_spec, self.judge_spec, self.reference = prompts, judge, reference
        self.every, self.max_prompts, self.seed, self.n_boot = every, max_prompts, seed, n_boot
        self.decoding = decoding or Decoding(max_new_tokens=64, seed=seed)
        self.out_dir, self.prefix = (Path(out_dir) if out_dir else None), prefix
        self.history: list[dict] = []
        self._prompts = self._judge = self._ref = self._demo = None
        self._evals = 0

    # -- lazy pieces -------------------------------------------------------------------------------------
    def _load(self):
        if self._prompts is None:
            from .winrate import is_demo_prompts

            if isinstance(self.prompts_spec, str):
                from stages.evaluate import load_prompts

                self._prompts, _ = load_prompts(self.prompts_spec, seed=self.seed, max_prompts=self.max_prompts)
            else:
                self._prompts = list(self.prompts_spec)[: self.max_prompts]
            self._demo = is_demo_prompts(self._prompts)
        if self._judge is None:
            from .judges import build_judge

            self._judge = build_judge(self.judge_spec)
        return self._prompts

    def _generate(self, model, tokenizer):
        from .generate import generate_responses

        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            return generate_responses(model, tokenizer, self._prompts, self.decoding)
        finally:
            tokenizer.padding_side = side

    def _reference(self, model, tokenizer):
        if self._ref is not None:
            return self._ref
        if self.reference is not None:
            from .generate import cached_generate

            cache = (self.out_dir / "generations") if self.out_dir else None
            if cache is not None:
                self._ref = cached_generate(self.reference, self._prompts, self.decoding, cache_dir=cache,
                                            label="reference", log=lambda m: None)
            else:
                from .generate import generate_responses, load_for_generation

                ref_model, ref_tok = load_for_generation(str(self.reference))
                self._ref = generate_responses(ref_model, ref_tok, self._prompts, self.decoding)
        else:
            ctx = model.disable_adapter() if hasattr(model, "disable_adapter") and hasattr(model, "peft_config") \
                else contextlib.nullcontext()
            with ctx:
                self._ref = self._generate(model, tokenizer)
        return self._ref

    # -- hooks ---------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kw):
        no_adapter = not (hasattr(model, "disable_adapter") and hasattr(model, "peft_config"))
        if self.reference is None and no_adapter and state.is_world_process_zero and model is not None:
            self._load()
            self._reference(model, processing_class)  # snapshot of the starting policy

    def on_evaluate(self, args, state, control, metrics=None, model=None, processing_class=None, **kw):
        """Generation seeds the RNGs (decoding.seed); training's own random streams continue as if it never ran."""
        from stages.core.ppo.checkpoint import _rng_state, _set_rng_state

        saved = _rng_state()
        try:
            return self._on_evaluate(args, state, control, metrics=metrics, model=model,
                                     processing_class=processing_class, **kw)
        finally:
            _set_rng_state(saved)

    def _on_evaluate(self, args, state, control, metrics=None, model=None, processing_class=None, **kw):
        metrics = metrics if metrics is not None else {}
        if "eval_loss" not in metrics and any(k.endswith("_loss") for k in metrics):
            return  # a "before training" evaluation under another prefix, not a training evaluation
        self._evals += 1
        if self._evals % self.every or not state.is_world_process_zero or model is None or processing_class is None:
            return
        from .winrate import compare

        prompts = self._load()
        ref = self._reference(model, processing_class)
        pol = self._generate(model, processing_class)
        res = compare(prompts, pol.responses, ref.responses, self._judge, len_policy=pol.n_tokens,
                      len_reference=ref.n_tokens, demo=self._demo, n_boot=self.n_boot, seed=self.seed)
        st, p = res["stats"], self.prefix
        entry = {f"{p}": st.win_rate, f"{p}_ci_low": st.wilson[0], f"{p}_ci_high": st.wilson[1],
                 f"{p}_tie_rate": st.tie_rate, f"{p}_lc": st.lc_win_rate, f"{p}_mean_len": st.mean_len_policy}
        if res["verifier"]:
            entry[f"{p}_policy_pass_rate"] = res["verifier"]["policy_pass_rate"]
        metrics.update({f"eval_{k}": v for k, v in entry.items()})
        entry = {**entry, "step": state.global_step, "epoch": state.epoch}
        state.log_history.append(entry)
        self.history.append(entry)
        if self.out_dir is not None:
            from .report import write_report

            write_report(self.out_dir / f"step-{state.global_step}", {
                "policy": f"training model at step {state.global_step}", "reference": str(self.reference or "start"),
                "judge": {"spec": str(self.judge_spec), "name": self._judge.name}, "prompts": {
                    "source": self.prompts_spec if isinstance(self.prompts_spec, str) else "given list", "count": len(prompts)}, "decoding": asdict(self.decoding),
                "bootstrap": {"n_boot": self.n_boot, "seed": self.seed}, "stats": st.to_dict(), "length_unit": "tokens",
                "verifier": res["verifier"], "judge_details": res["judge_details"], "per_prompt": res["per_prompt"]})
