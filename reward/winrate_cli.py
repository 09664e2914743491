"""`rlhf winrate`: preference win rate of a policy against a reference, with intervals and a report.

    rlhf winrate --policy runs/x/dpo --reference runs/x/sft --judge runs/x/rm --prompts held_out.jsonl [--out DIR]

--out defaults to a sibling of the policy dir: runs/x/winrate-dpo-vs-sft. Same flags as
`python -m stages.evaluate` (decoding, --max_prompts, --seed, --n_bootstrap, --device).
"""
from __future__ import annotations

import sys
from pathlib import Path


def default_out(policy: str, reference: str) -> str:
    p, r = Path(policy).expanduser(), Path(reference).expanduser()
    parent = p.parent if p.exists() else Path(".")
    return str(parent / f"winrate-{p.name or 'policy'}-vs-{r.name or 'reference'}")


def _run(argv):
    from stages import evaluate

    args = evaluate.build_parser(prog="rlhf winrate", out_required=False).parse_args(argv)
    if args.out is None:
        args.out = default_out(args.policy, args.reference)
    report = evaluate.main(args)
    st = report["stats"]
    (il, ih), (wl, wh), (bl, bh) = st["interval"], st["wilson"], st["bootstrap"]
    lines = [f"win rate {st['win_rate']:.3f}  95% CI {il:.3f}-{ih:.3f} (win/tie/loss), {bl:.3f}-{bh:.3f} (bootstrap), "
             f"{wl:.3f}-{wh:.3f} (Wilson)",
             f"  {st['wins']} wins / {st['ties']} ties ({st['tie_rate']:.1%}) / {st['losses']} losses over {st['n']} prompts"]
    if st.get("lc_win_rate") is not None:
        iv = st.get("lc_interval")
        lines.append(f"  length-controlled win rate {st['lc_win_rate']:.3f}"
                     + (f" (95% CI {iv[0]:.3f}-{iv[1]:.3f})" if iv else "") + "; mean length policy "
                     f"{st['mean_len_policy']:.1f} vs reference {st['mean_len_reference']:.1f} tokens")
        if st.get("lc_warning"):
            lines.append(f"  warning: {st['lc_warning']}")
    if report.get("verifier"):
        v = report["verifier"]
        lines.append(f"  verifier pass rate: policy {v['policy_pass_rate']:.3f}, reference {v['reference_pass_rate']:.3f}")
    lines.append(f"  report: {Path(args.out) / 'report.md'}")
    print("\n".join(lines), flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    from stages.core.stage import run_cli

    return run_cli(_run, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
