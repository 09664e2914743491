"""Win-rate statistics: outcomes (1 win, 0.5 tie, 0 loss, from the policy's viewpoint) → rates and intervals.

- win rate counts a tie as half a win; the tie rate is reported separately;
- headline 95% interval (`interval`): mean score ± z·sqrt(sample variance / n) over the win/tie/loss
  scores. The Wilson interval (`wilson`, kept for comparison) treats a tie as a coin flip, which
  overstates the variance of a tie (0 around 0.5, not 0.25): with many ties it is up to ~2x too wide;
- a seeded percentile bootstrap over prompts;
- length-controlled win rate (AlpacaEval 2 style): a logistic regression of the outcome on
  tanh(standardised length difference), read at a length difference of zero, with its own bootstrap
  interval and a warning when zero lies outside the observed differences (an extrapolation).
Pure numpy; no model code here.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

Z95 = 1.959963984540054


def _outcomes(outcomes) -> np.ndarray:
    x = np.asarray(list(outcomes), dtype=float)
    if x.ndim != 1:
        raise ValueError("outcomes must be a flat list")
    if not np.all(np.isin(x, (0.0, 0.5, 1.0))):
        raise ValueError("outcomes must be 1 (win), 0.5 (tie) or 0 (loss)")
    return x


def wilson_interval(wins: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion; `wins` may be fractional (ties count half). (nan, nan) for n=0."""
    if n <= 0:
        return (math.nan, math.nan)
    p = wins / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))  # contains p despite rounding


def outcome_interval(outcomes, z: float = Z95) -> tuple[float, float]:
    """Interval for the mean of win/tie/loss scores (1, 0.5, 0) from their sample variance, clipped to [0, 1].

    When every outcome is the same the sample variance is 0 and the interval would collapse to a
    point; the (wider) Wilson interval is used then. (nan, nan) for no outcomes."""
    x = _outcomes(outcomes)
    n = len(x)
    if n == 0:
        return (math.nan, math.nan)
    var = float(x.var(ddof=1)) if n > 1 else 0.0
    if var == 0.0:
        return wilson_interval(float(x.sum()), n, z)
    mean, half = float(x.mean()), z * math.sqrt(var / n)
    return (max(0.0, mean - half), min(1.0, mean + half))


def bootstrap_interval(outcomes, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean outcome (resampling prompts); deterministic for a seed."""
    x = _outcomes(outcomes)
    if len(x) == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(lo), float(hi))


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def logistic_fit(x: np.ndarray, y: np.ndarray, *, l2: float = 1e-3, iters: int = 100) -> np.ndarray:
    """Newton's method for a logistic regression with soft targets y in [0, 1]; x includes the intercept column.

    A small L2 penalty (not on the intercept) keeps separable data finite.
    """
    w = np.zeros(x.shape[1])
    reg = np.full(x.shape[1], l2)
    reg[0] = 0.0
    for _ in range(iters):
        p = _sigmoid(x @ w)
        grad = x.T @ (p - y) / len(y) + reg * w
        hess = (x * (p * (1 - p))[:, None]).T @ x / len(y) + np.diag(reg) + 1e-9 * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return w


def _lc_fit(y: np.ndarray, d: np.ndarray) -> dict:
    sd = float(d.std())
    if len(y) < 2 or sd == 0.0:  # no length variation to control for
        return {"win_rate": float(y.mean()) if len(y) else math.nan, "slope": 0.0, "intercept": math.nan}
    x = np.stack([np.ones_like(d), np.tanh(d / sd)], axis=1)
    b0, b1 = logistic_fit(x, y)
    return {"win_rate": float(_sigmoid(b0)), "slope": float(b1), "intercept": float(b0)}


def length_warning(d) -> str | None:
    """A warning when every length difference has the same sign: the rate at zero is then an extrapolation."""
    d = np.asarray(d, dtype=float)
    if len(d) and np.all(d > 0):
        return ("the policy's response is longer on every prompt: the length-controlled win rate "
                "extrapolates to equal length, outside the data")
    if len(d) and np.all(d < 0):
        return ("the policy's response is shorter on every prompt: the length-controlled win rate "
                "extrapolates to equal length, outside the data")
    return None


def length_controlled(outcomes, len_policy, len_reference, *, n_boot: int = 0, seed: int = 0,
                      level: float = 0.95) -> dict:
    """Win rate predicted at zero length difference; `slope` > 0 means longer answers win more often.

    With n_boot > 0 also "interval": a percentile bootstrap over prompts (the fit refitted per resample).
    "warning" is set when zero length difference lies outside the data."""
    y = _outcomes(outcomes)
    d = np.asarray(list(len_policy), dtype=float) - np.asarray(list(len_reference), dtype=float)
    if len(d) != len(y):
        raise ValueError(f"{len(y)} outcomes but {len(d)} length differences")
    out = dict(_lc_fit(y, d), warning=length_warning(d))
    if n_boot > 0 and len(y):
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(y), size=(n_boot, len(y)))
        rates = np.array([_lc_fit(y[i], d[i])["win_rate"] for i in idx])
        lo, hi = np.quantile(rates, [(1 - level) / 2, 1 - (1 - level) / 2])
        out["interval"] = (float(lo), float(hi))
    return out


@dataclass
class WinRate:
    n: int
    wins: int
    ties: int
    losses: int
    win_rate: float  # (wins + ties / 2) / n
    tie_rate: float
    loss_rate: float
    interval: tuple  # headline 95% interval (win/tie/loss sample variance)
    wilson: tuple  # Wilson on ties-as-half-wins: too wide when there are many ties
    bootstrap: tuple
    lc_win_rate: float | None
    lc_interval: tuple | None  # bootstrap over prompts
    lc_warning: str | None  # set when the length control extrapolates
    length_slope: float | None
    mean_len_policy: float | None
    mean_len_reference: float | None

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def headline(self) -> str:
        lo, hi = self.interval
        s = (f"win rate {self.win_rate:.3f} (95% CI {lo:.3f}-{hi:.3f}) over {self.n} prompts: {self.wins} wins, "
             f"{self.ties} ties ({self.tie_rate:.1%}), {self.losses} losses")
        if self.lc_win_rate is not None:
            s += f"; length-controlled {self.lc_win_rate:.3f}"
            if self.lc_interval is not None:
                s += f" (95% CI {self.lc_interval[0]:.3f}-{self.lc_interval[1]:.3f})"
            if self.lc_warning:
                s += f" [warning: {self.lc_warning}]"
        return s


def summarize(outcomes, len_policy=None, len_reference=None, *, n_boot: int = 2000, seed: int = 0) -> WinRate:
    """All statistics for one comparison (lengths optional: without them no length control)."""
    x = _outcomes(outcomes)
    n = len(x)
    wins, ties = int((x == 1).sum()), int((x == 0.5).sum())
    losses = n - wins - ties
    rate = float(x.mean()) if n else math.nan
    lc = lc_iv = lc_warn = slope = mp = mr = None
    if len_policy is not None and len_reference is not None:
        lp, lr = list(len_policy), list(len_reference)
        mp, mr = (float(np.mean(lp)), float(np.mean(lr))) if n else (None, None)
        if n:
            fit = length_controlled(x, lp, lr, n_boot=n_boot, seed=seed)
            lc, slope, lc_iv, lc_warn = fit["win_rate"], fit["slope"], fit.get("interval"), fit["warning"]
    return WinRate(n=n, wins=wins, ties=ties, losses=losses, win_rate=rate, tie_rate=ties / n if n else math.nan,
                   loss_rate=losses / n if n else math.nan, interval=outcome_interval(x),
                   wilson=wilson_interval(wins + 0.5 * ties, n), bootstrap=bootstrap_interval(x, n_boot=n_boot, seed=seed),
                   lc_win_rate=lc, lc_interval=lc_iv, lc_warning=lc_warn, length_slope=slope,
                   mean_len_policy=mp, mean_len_reference=mr)


def per_prompt_table(prompts, policy, reference, outcomes, *, scores_policy=None, scores_reference=None,
                     len_policy=None, len_reference=None, extra=None) -> list[dict]:
    """One row per prompt: texts, outcome, judge scores and lengths where known."""
    from .rules import prompt_text, response_text

    rows = []
    for i, (p, a, b, o) in enumerate(zip(prompts, policy, reference, outcomes)):
        row = {"index": i, "prompt": prompt_text(p), "policy": response_text(a), "reference": response_text(b),
               "outcome": float(o), "result": {1.0: "win", 0.5: "tie", 0.0: "loss"}[float(o)]}
        for key, seq in (("score_policy", scores_policy), ("score_reference", scores_reference),
                         ("len_policy", len_policy), ("len_reference", len_reference)):
            if seq is not None:
                row[key] = seq[i]
        for key, seq in (extra or {}).items():
            row[key] = seq[i]
        rows.append(row)
    return rows


def is_demo_prompts(prompts) -> bool:
    """True when every prompt is one of the built-in demo prompts (so the demo verifier applies)."""
    from stages.core import demo

    from .rules import prompt_text

    known = {prompt_text(r["prompt"]) for r in demo.load("prompts")}
    texts = [prompt_text(p) for p in prompts]
    return bool(texts) and all(t in known for t in texts)


def compare(prompts, policy, reference, judge, *, len_policy=None, len_reference=None, demo: bool = False,
            n_boot: int = 2000, seed: int = 0) -> dict:
    """Judge policy (A) against reference (B) on each prompt and compute every statistic.

    Returns {"stats": WinRate, "judgement", "per_prompt", "verifier" (demo prompts: pass rates), "judge_details"}.
    """
    from .judges import VerifierJudge, judge_detailed

    prompts, policy, reference = list(prompts), list(policy), list(reference)
    j = judge_detailed(judge, prompts, policy, reference)
    stats = summarize(j.outcomes, len_policy, len_reference, n_boot=n_boot, seed=seed)
    per_item = {k: v for k, v in j.extra.items() if isinstance(v, list) and len(v) == len(prompts)}
    table = per_prompt_table(prompts, policy, reference, j.outcomes, scores_policy=j.scores_a,
                             scores_reference=j.scores_b, len_policy=len_policy, len_reference=len_reference,
                             extra=per_item)
    details = {k: v for k, v in j.extra.items() if k not in per_item}
    verifier = None
    if demo:
        from stages.core.demo import pass_rate

        verifier = {"policy_pass_rate": pass_rate(prompts, policy), "reference_pass_rate": pass_rate(prompts, reference)}
        if not isinstance(judge, VerifierJudge):  # the judge's own quality: agreement with the verifier
            ref = VerifierJudge().judge(prompts, policy, reference)
            decisive = [(o, r) for o, r in zip(j.outcomes, ref) if r != 0.5]
            details["agreement_with_verifier"] = (sum(o == r for o, r in decisive) / len(decisive)) if decisive else None
            details["verifier_decisive_pairs"] = len(decisive)
    return {"stats": stats, "judgement": j, "per_prompt": table, "verifier": verifier, "judge_details": details}
