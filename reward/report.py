"""Win-rate reports: report.json (every number + the per-prompt table), report.md, winrate.png, per_prompt.jsonl.

Each file is written to a temporary name and renamed into place, so a reader never sees half a report.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

_SKIP_METRICS = ("runtime", "per_second", "epoch", "steps")


def model_comparison(manifest: dict | None) -> dict | None:
    """Held-out metrics of the fine-tuned model next to the starting model's on the same split.

    From a stage manifest's metrics: "base" (the base model, adapters disabled) or "start" (the untrained
    starting point) against "final" (keys "base_X"/"start_X" paired with "eval_X").
    """
    metrics = (manifest or {}).get("metrics") or {}
    final = metrics.get("final") or {}
    for before in ("base", "start"):
        ref = metrics.get(before) or {}
        rows = []
        for k, v in ref.items():
            name = k[len(before) + 1:] if k.startswith(before + "_") else None
            if name is None or any(s in name for s in _SKIP_METRICS) or not isinstance(v, (int, float)):
                continue
            after = final.get(f"eval_{name}")
            if isinstance(after, (int, float)):
                rows.append({"metric": name, before: v, "final": after})
        if rows:
            return {"against": before, "split": "validation", "rows": rows}
    return None


OVEROPTIMIZATION = "reward over-optimization suspected"


def is_gold_judge(name: str) -> bool:
    """The demo verifier judging itself: its pass rates then add nothing to its win rate."""
    return str(name) == "verifier:demo"


def overoptimization(stats: dict, verifier: dict | None = None, *, judge_is_gold: bool = False) -> dict:
    """Flag "reward over-optimization suspected": the judge prefers the policy (win rate above 0.5) but the
    length-controlled win rate (at or below 0.5: the preference is explained by length) or the gold judge
    (the verifier's pass rate, lower for the policy than for the reference) says otherwise.
    `judge_is_gold`: the judge is the verifier itself, whose pass rates then say nothing new."""
    win, lc = stats.get("win_rate"), stats.get("lc_win_rate")
    out = {"suspected": False, "reasons": [], "win_rate": win, "lc_win_rate": lc, "gold": None}
    if verifier and verifier.get("policy_pass_rate") is not None:
        out["gold"] = {"metric": "verifier pass rate", "policy": verifier["policy_pass_rate"],
                       "reference": verifier["reference_pass_rate"]}
    if win is None or not win > 0.5:
        return out
    if lc is not None and lc <= 0.5:
        out["reasons"].append(f"length-controlled win rate {lc:.3f} is not above 0.5 while the judge's win rate is "
                              f"{win:.3f}: the preference is explained by response length")
    gold = out["gold"]
    if gold and not judge_is_gold and gold["policy"] < gold["reference"]:
        out["reasons"].append(f"the gold judge disagrees: verifier pass rate {gold['policy']:.3f} for the policy, "
                              f"{gold['reference']:.3f} for the reference")
    out["suspected"] = bool(out["reasons"])
    return out


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _cell(text, limit: int = 120) -> str:
    s = " ".join(str(text).split())
    s = s if len(s) <= limit else s[: limit - 1] + "…"
    return s.replace("|", "\\|").replace("`", "\\`")


def _interval(st: dict):
    """The headline interval; reports written before it existed only hold Wilson's."""
    return st.get("interval") or st["wilson"]


def to_markdown(report: dict, *, max_rows: int = 50) -> str:
    st, dec = report["stats"], report.get("decoding", {})
    unit = report.get("length_unit", "tokens")
    lines = [f"# Win rate: {Path(report['policy']).name} vs {Path(report['reference']).name}", "",
             f"- policy: `{report['policy']}`", f"- reference: `{report['reference']}`",
             f"- judge: `{report['judge']['name']}` (spec `{report['judge']['spec']}`)",
             f"- prompts: {report['prompts']['count']} from `{report['prompts']['source']}`"]
    if dec:
        mode = "greedy" if not dec.get("temperature") else f"temperature {dec['temperature']}, top_p {dec['top_p']}"
        lines.append(f"- decoding (identical for both): {mode}, max_new_tokens {dec['max_new_tokens']}, "
                     f"seed {dec['seed']}")
    (il, ih), (wl, wh), (bl, bh) = _interval(st), st["wilson"], st["bootstrap"]
    lc_iv = st.get("lc_interval")
    lc = _fmt(st["lc_win_rate"]) + (f" (95% bootstrap {_fmt(lc_iv[0])} – {_fmt(lc_iv[1])})" if lc_iv else "")
    lines += ["", "| | value |", "|---|---|",
              f"| **win rate** (ties count ½) | **{_fmt(st['win_rate'])}** |",
              f"| **95% interval** (win/tie/loss variance) | **{_fmt(il)} – {_fmt(ih)}** |",
              f"| 95% Wilson interval (a tie as a coin flip: too wide with many ties) | {_fmt(wl)} – {_fmt(wh)} |",
              f"| 95% bootstrap interval ({report.get('bootstrap', {}).get('n_boot', '?')} resamples, seed "
              f"{report.get('bootstrap', {}).get('seed', '?')}) | {_fmt(bl)} – {_fmt(bh)} |",
              f"| length-controlled win rate | {lc} |",
              f"| wins / ties / losses | {st['wins']} / {st['ties']} / {st['losses']} |",
              f"| tie rate | {_fmt(st['tie_rate'])} |",
              f"| mean response length ({unit}): policy / reference | {_fmt(st['mean_len_policy'], 1)} / "
              f"{_fmt(st['mean_len_reference'], 1)} |"]
    if st.get("lc_warning"):
        lines += ["", f"> **Length control warning:** {st['lc_warning']}."]
    flag = report.get("overoptimization") or {}
    if flag.get("suspected"):
        lines += ["", f"> **{OVEROPTIMIZATION.capitalize()}:** " + "; ".join(flag["reasons"]) + "."]
    if report.get("verifier"):
        v = report["verifier"]
        lines += ["", "## Verifier pass rate (demo prompts)", "", "| policy | reference |", "|---|---|",
                  f"| {_fmt(v['policy_pass_rate'])} | {_fmt(v['reference_pass_rate'])} |"]
    jd = {k: v for k, v in (report.get("judge_details") or {}).items() if v is not None}
    if jd:
        lines += ["", "## Judge", ""] + [f"- {k.replace('_', ' ')}: {_fmt(v)}" for k, v in jd.items()]
    cmp_ = report.get("base_comparison")
    if cmp_:
        before = cmp_["against"]
        lines += ["", f"## Fine-tuned vs {before} model (held-out {cmp_['split']} split, from the policy's manifest)", "",
                  f"| metric | {before} | fine-tuned |", "|---|---|---|"]
        lines += [f"| {r['metric']} | {_fmt(r[before], 4)} | {_fmt(r['final'], 4)} |" for r in cmp_["rows"]]
    rows = report.get("per_prompt") or []
    if rows:
        shown = rows[:max_rows]
        lines += ["", f"## Per prompt ({len(shown)} of {len(rows)}; all in report.json and per_prompt.jsonl)", "",
                  "| # | result | prompt | policy | reference | score policy / reference |", "|---|---|---|---|---|---|"]
        for r in shown:
            sc = (f"{_fmt(r['score_policy'])} / {_fmt(r['score_reference'])}" if "score_policy" in r else "")
            lines.append(f"| {r['index']} | {r['result']} | {_cell(r['prompt'], 80)} | {_cell(r['policy'])} | "
                         f"{_cell(r['reference'])} | {sc} |")
    if report.get("plot"):
        lines += ["", f"![win rate]({report['plot']})"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path) -> Path:
    """Win/tie/loss bar with the win rate and its headline interval; histogram of response lengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = report["stats"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
    left = 0.0
    for key, colour, label in (("wins", "#2e7d32", "win"), ("ties", "#9e9e9e", "tie"), ("losses", "#c62828", "loss")):
        frac = st[key] / st["n"] if st["n"] else 0.0
        ax1.barh([0], [frac], height=0.5, left=left, color=colour, label=f"{label} {frac:.0%}")
        left += frac
    lo, hi = _interval(st)
    ax1.errorbar([st["win_rate"]], [0.55], xerr=[[st["win_rate"] - lo], [hi - st["win_rate"]]], fmt="o", color="k",
                 capsize=4, label=f"win rate {st['win_rate']:.3f} (95% CI)")
    ax1.axvline(0.5, ls="--", color="k", lw=0.8)
    ax1.set_xlim(0, 1)
    ax1.set_ylim(-0.6, 1.0)
    ax1.set_yticks([])
    ax1.set_title(f"policy vs reference (n={st['n']})", fontsize=10)
    ax1.legend(fontsize=7, loc="upper left", ncol=2)
    rows = report.get("per_prompt") or []
    lp = [r["len_policy"] for r in rows if "len_policy" in r]
    lr = [r["len_reference"] for r in rows if "len_reference" in r]
    if lp and lr:
        bins = min(30, max(5, len(set(lp + lr))))
        ax2.hist([lp, lr], bins=bins, label=["policy", "reference"], color=["#1565c0", "#ef6c00"], alpha=0.8)
        ax2.legend(fontsize=8)
    ax2.set_title(f"response length ({report.get('length_unit', 'tokens')})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)
    return path


def _atomic(path: Path, write) -> Path:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_report(out_dir, report: dict) -> dict[str, Path]:
    """Write report.json, report.md, winrate.png (best effort) and per_prompt.jsonl into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    try:
        paths["plot"] = _atomic(out / "winrate.png", lambda p: plot(report, p))
        report = dict(report, plot="winrate.png")
    except Exception as e:  # a plot must never cost the numbers
        report = dict(report, plot=None, plot_error=str(e))
    rows = report.get("per_prompt") or []
    paths["per_prompt"] = _atomic(out / "per_prompt.jsonl", lambda p: p.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"))
    paths["json"] = _atomic(out / "report.json", lambda p: p.write_text(
        json.dumps(report, indent=2, ensure_ascii=False, default=str), encoding="utf-8"))
    paths["markdown"] = _atomic(out / "report.md", lambda p: p.write_text(to_markdown(report), encoding="utf-8"))
    return paths
