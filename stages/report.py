"""`rlhf report RUN_DIR`: one self-contained report.html for a stage output or a whole chain run dir.

Everything is inlined (CSS, a few lines of JS, plots as data: URIs), so the file opens from disk with no
server and no network. It shows each stage's lineage back to the base model, its metrics against the
base/start model, its curves, and for win-rate evaluations the per-prompt table (both responses side by
side, verdict, judge scores) with outcome filters; `report.html#filter=loss` opens filtered. Every text
that came from a model or a file is HTML-escaped, and secrets are redacted (stages/core/secrets.py).
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import sys
import time
from pathlib import Path

from .core import artifacts
from .core.secrets import redact_text, scrub

REPORT = "report.html"
BOOKKEEPING = ("runtime", "per_second", "preparation_time", "num_tokens", "epoch", "logits/", "total_flos")
KEY_CONFIG = ("peft_method", "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
              "gradient_accumulation_steps", "max_length", "beta", "loss_type", "kl_coef", "num_generations", "seed")


def stage_dirs(run_dir: Path) -> list[Path]:
    """The stage outputs a report covers: RUN_DIR itself when it is one, else its finished sub-folders in run order."""
    if artifacts.read_manifest(run_dir):
        return [run_dir]
    found = [p for p in sorted(run_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")
             and (artifacts.read_manifest(p) or {}).get("status") == artifacts.COMPLETE]
    return sorted(found, key=finished_at)


def finished_at(path: Path) -> str:
    m = artifacts.read_manifest(path) or {}
    when = m.get("finished_at")
    if not when:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((path / artifacts.MANIFEST).stat().st_mtime))
    return when


def is_bookkeeping(name: str) -> bool:
    return any(word in name for word in BOOKKEEPING)


def metric_rows(manifest: dict) -> tuple[str | None, list[tuple[str, float | None, float]]]:
    """(against, [(metric, before, after)]) from a manifest: the base (adapters off) or start model vs final."""
    metrics = manifest.get("metrics") or {}
    final = metrics.get("final") or {}
    for before in ("base", "start"):
        ref = metrics.get(before) or {}
        rows = []
        for key, after in final.items():
            name = key[5:] if key.startswith("eval_") else key
            if is_bookkeeping(name) or not isinstance(after, (int, float)) or isinstance(after, bool):
                continue
            value = ref.get(f"{before}_{name}", ref.get(name))
            rows.append((name, value if isinstance(value, (int, float)) else None, after))
        if ref and rows:
            return before, rows
    rows = [(k, None, v) for k, v in final.items() if isinstance(v, (int, float)) and not is_bookkeeping(k)]
    if not rows:  # an evaluation stage: its manifest metrics are the headline figures
        rows = [(k, None, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return None, rows


def lineage(path: Path) -> list[tuple[str, str]]:
    """[(label, path)] from the base model to this stage (the stage's parents, oldest first)."""
    from .lineage import walk

    steps = []
    for p, m in reversed(walk(str(path))):
        steps.append(((m or {}).get("stage") or f"base model ({Path(p).name})", p))
    return steps


def _e(value) -> str:
    """Redacted and HTML-escaped: model outputs and file contents never become markup."""
    return html.escape(redact_text("" if value is None else str(value)), quote=True)


def _num(value) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.4g}"
    return _e(value)


def _image(path: Path, alt: str, png: bytes | None = None) -> str:
    if png is None:
        if not path.is_file():
            return ""
        png = path.read_bytes()
    return f'<img class="plot" alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _curves(path: Path, manifest: dict) -> str:
    """The stage's curated curves drawn afresh from metrics.json (outputs older than the curated plots too)."""
    try:
        history = json.loads((path / "metrics.json").read_text()).get("log_history") or []
        from .core.plots import build_figure

        fig = build_figure(history, stage=manifest.get("stage"), metrics=manifest.get("metrics"),
                           title=f"{manifest.get('stage')}: {path.name}")
    except (OSError, ValueError, AttributeError):
        fig = None
    if fig is None:
        return _image(path / "curves.png", f"{path.name} training curves")
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return _image(path, f"{path.name} training curves", buffer.getvalue())


def _metrics_table(manifest: dict) -> str:
    against, rows = metric_rows(manifest)
    if not rows:
        return ""
    head = f"<tr><th>metric (validation)</th><th>{_e(against or '')}</th><th>final</th><th>change</th></tr>" if against \
        else "<tr><th>metric</th><th></th><th>value</th><th></th></tr>"
    body = []
    for name, before, after in rows:
        change = f"{after - before:+.4g}" if isinstance(before, (int, float)) else ""
        body.append(f"<tr><td>{_e(name)}</td><td>{_num(before)}</td><td>{_num(after)}</td><td>{change}</td></tr>")
    return f'<table class="metrics">{head}{"".join(body)}</table>'


def _config_line(manifest: dict) -> str:
    config = manifest.get("config") or {}
    flat = {k: v for group in config.values() if isinstance(group, dict) for k, v in group.items()}
    parts = [f"{k}={flat[k]}" for k in KEY_CONFIG if flat.get(k) not in (None, -1, "")]
    data = manifest.get("data") or {}
    sources = [f"{s.get('source')} ({s.get('rows_kept')} rows)" for s in data.get("sources", [])]
    out = f"<p class='config'><b>config:</b> {_e(', '.join(parts) or '-')}</p>" if parts else ""
    if sources:
        out += f"<p class='config'><b>data:</b> {_e('; '.join(sources))}</p>"
    return out


def _winrate_section(path: Path) -> str:
    report = json.loads((path / "report.json").read_text())
    rows = report.get("per_prompt")
    per_prompt = path / "per_prompt.jsonl"
    if rows is None and per_prompt.is_file():
        rows = [json.loads(line) for line in per_prompt.read_text().splitlines() if line.strip()]
    rows = rows or []
    counts = {k: sum(1 for r in rows if r.get("result") == k) for k in ("win", "tie", "loss")}
    judge = (report.get("judge") or {}).get("name")
    policy, reference = Path(str(report.get("policy"))).name, Path(str(report.get("reference"))).name
    buttons = "".join(f'<button type="button" data-filter="{k}">{label} ({n})</button>'
                      for k, label, n in (("all", "all", len(rows)), ("win", "policy wins", counts["win"]),
                                          ("tie", "ties", counts["tie"]), ("loss", "policy loses", counts["loss"])))
    body = []
    for r in rows:
        scores = " / ".join(_num(r.get(k)) for k in ("score_policy", "score_reference") if k in r)
        body.append(f'<tr class="prompt-row {_e(r.get("result"))}" data-outcome="{_e(r.get("result"))}">'
                    f'<td>{_e(r.get("index"))}</td><td class="text">{_e(r.get("prompt"))}</td>'
                    f'<td class="text">{_e(r.get("policy"))}</td><td class="text">{_e(r.get("reference"))}</td>'
                    f'<td class="verdict">{_e(r.get("result"))}</td><td>{scores or "&ndash;"}</td></tr>')
    return (f"<p class='headline'>{_e(report.get('headline'))}</p><p>judge: <code>{_e(judge)}</code></p>"
            + _image(path / "winrate.png", "win rate")
            + f'<div class="filters" role="group">{buttons}</div>'
            f'<table class="per-prompt"><thead><tr><th>#</th><th>prompt</th><th>policy ({_e(policy)})</th>'
            f'<th>reference ({_e(reference)})</th><th>verdict</th><th>scores policy / reference</th></tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def stage_section(path: Path) -> str:
    manifest = scrub(artifacts.read_manifest(path) or {})
    stage = manifest.get("stage", "?")
    chain = " &rarr; ".join(f"<span title='{_e(p)}'>{_e(label)}</span>" for label, p in lineage(path))
    parts = [f"<section class='stage' id='stage-{_e(path.name)}'><h2>{_e(path.name)} <small>({_e(stage)})</small></h2>",
             f"<p class='lineage'><b>lineage:</b> {chain}</p>" if stage != "evaluate" else "",
             f"<p class='meta'>{_e(path)} &middot; finished {_e(finished_at(path))}"
             f"{' &middot; ' + _num(manifest.get('duration_s')) + ' s' if manifest.get('duration_s') else ''}"
             f" &middot; fingerprint <code>{_e(manifest.get('fingerprint'))}</code></p>",
             _config_line(manifest)]
    if stage == "evaluate" and (path / "report.json").is_file():
        parts.append(_winrate_section(path))
    else:
        parts.append(_metrics_table(manifest))
        parts.append(_curves(path, manifest))
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1300px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em}
small,.meta{color:#666}.meta,.config,.lineage{font-size:.9em;margin:.3em 0}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}td,th{border:1px solid #ddd;padding:.3em .5em;vertical-align:top}
th{background:#f4f4f4;text-align:left}.per-prompt{width:100%;table-layout:fixed}
.per-prompt td.text{white-space:pre-wrap;word-break:break-word}.per-prompt th:first-child{width:2.5em}
.per-prompt th:nth-child(5){width:5em}.per-prompt th:nth-child(6){width:9em}
tr.win td.verdict{background:#dff3df}tr.loss td.verdict{background:#f8dcdc}tr.tie td.verdict{background:#eee}
.plot{max-width:100%;border:1px solid #eee;margin:.5em 0}.headline{font-weight:600}
.filters button{margin-right:.4em;padding:.25em .7em;border:1px solid #999;background:#fff;border-radius:3px;cursor:pointer}
.filters button.active{background:#335;color:#fff}
"""

SCRIPT = """
(function(){
  var buttons=document.querySelectorAll('.filters button');
  function apply(outcome){
    document.querySelectorAll('tr.prompt-row').forEach(function(row){
      row.hidden = outcome !== 'all' && row.getAttribute('data-outcome') !== outcome;});
    buttons.forEach(function(b){b.classList.toggle('active', b.getAttribute('data-filter')===outcome);});
  }
  buttons.forEach(function(b){b.addEventListener('click',function(){apply(b.getAttribute('data-filter'));});});
  var m=/filter=(all|win|tie|loss)/.exec(location.hash);
  apply(m?m[1]:'all');
  document.body.setAttribute('data-ready','yes');
})();
"""


def render(run_dir: Path) -> str:
    dirs = stage_dirs(run_dir)
    toc = "".join(f"<li><a href='#stage-{_e(p.name)}'>{_e(p.name)}</a></li>" for p in dirs)
    sections = "\n".join(stage_section(p) for p in dirs)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>rlhf report: {_e(run_dir.name)}</title>"
            f"<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
            f"style-src 'unsafe-inline'; script-src 'unsafe-inline'\"><style>{STYLE}</style></head><body>"
            f"<h1>rlhf report: {_e(run_dir.name)}</h1><p class='meta'>{_e(run_dir)} &middot; written "
            f"{_e(time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))}</p><ul class='toc'>{toc}</ul>{sections}"
            f"<script>{SCRIPT}</script></body></html>")


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write RUN_DIR/report.html (or `out`) atomically; a folder without stage outputs is a user error."""
    from .core.errors import ConfigError

    run_dir = Path(run_dir).expanduser().resolve()
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: not a folder")
    if not stage_dirs(run_dir):
        raise ConfigError(f"{run_dir}: neither a stage output nor a run dir holding finished stage outputs (no manifest.json)")
    target = Path(out) if out else run_dir / REPORT
    text = render(run_dir)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)
    return target


def main(argv=None) -> int:
    from .core.errors import UserError

    p = argparse.ArgumentParser(prog="rlhf report", description="Write one self-contained report.html for a stage "
                                "output or a chain run dir (lineage, metrics vs base, plots, per-prompt win-rate table).")
    p.add_argument("run_dir")
    p.add_argument("--out", help="where to write (default RUN_DIR/report.html)")
    a = p.parse_args(argv)
    try:
        print(write_report(a.run_dir, a.out))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
