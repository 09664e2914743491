"""Model cards (README.md) generated from a stage's manifest.

The card states what the output is and how it was made: base model and lineage (parent manifests followed
back to the base), datasets with row counts and fingerprints, PEFT method and trainable share, key
hyperparameters, final metrics against the starting point, the reproducing command, package versions and
git commit, under Hugging Face model-card YAML front matter. Nothing secret is printed: keys that name a
token, secret, password or API key are skipped and such command-line values are masked.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .secrets import is_secret, scrub, scrub_command  # noqa: F401  (re-exported: cards use them)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HYPERPARAMETERS = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                   "gradient_accumulation_steps", "per_device_eval_batch_size", "max_length", "lr_scheduler_type",
                   "warmup_steps", "warmup_ratio", "weight_decay", "beta", "loss_type", "loss_weights",
                   "label_smoothing", "desirable_weight", "undesirable_weight", "center_rewards_coefficient",
                   "packing", "bf16", "fp16", "seed")
METHOD_KEYS = {"lora": ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_rslora"),
               "prefix": ("num_virtual_tokens",), "prompt": ("num_virtual_tokens", "prompt_tuning_init_text"),
               "ia3": ("ia3_target_modules",), "adapters": ("adapter_size", "adapter_placement", "adapter_non_linearity")}
METHOD_KEYS["dora"] = METHOD_KEYS["qlora"] = METHOD_KEYS["lora"] + ("qlora_bits",)
NOISE = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time", "num_tokens", "epoch")


def fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}" if 1e-3 <= abs(v) < 1e5 else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v))
    return str(v)


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]


def stage_name(manifest: dict) -> str:
    """The stage: recorded, or inferred from the preference method, the task or the command."""
    if manifest.get("stage") or manifest.get("method"):
        return str(manifest.get("stage") or manifest.get("method"))
    if manifest.get("task") == "reward_model":
        return "rm"
    if (manifest.get("data") or {}).get("task") == "sft":
        return "sft"
    m = re.search(r"stages[/.](\w+)(?:\.py)?\b|\brlhf (\w+)", str(manifest.get("command", "")))
    return (m.group(1) or m.group(2)) if m else "model"


def hub_model_id(name) -> str | None:
    """A Hub id for front matter (the Hub rejects local paths there); built-in aliases map to their Hub id."""
    if not name:
        return None
    try:
        from .models import ALIASES

        if str(name) in ALIASES:
            return ALIASES[str(name)].hub_id
    except Exception:
        pass
    name = str(name)
    return name if HUB_ID.match(name) and not Path(name).expanduser().exists() else None


def lineage(manifest: dict, limit: int = 20) -> list[dict]:
    """The chain of parent stage outputs, nearest first, ending at the external base model."""
    chain, parent = [], manifest.get("parent") or {}
    while parent and len(chain) < limit:
        path = parent.get("path")
        pm = None
        if path and Path(path, "manifest.json").is_file():
            try:
                pm = json.loads(Path(path, "manifest.json").read_text())
            except (OSError, ValueError):
                pm = None
        if not pm:
            chain.append({"path": path, "stage": None})
            break
        chain.append({"path": path, "stage": stage_name(pm), "fingerprint": pm.get("fingerprint"),
                      "peft_method": pm.get("peft_method")})
        parent = pm.get("parent") or {}
    return chain


def license_of(manifest: dict) -> str | None:
    if manifest.get("license"):
        return str(manifest["license"])
    for group in (manifest.get("config") or {}).values():
        if isinstance(group, dict) and group.get("license"):
            return str(group["license"])
    return None


def front_matter(manifest: dict, stage: str, library: str) -> list[str]:
    lines = ["---"]
    if license_of(manifest):
        lines.append(f"license: {license_of(manifest)}")
    base = hub_model_id(manifest.get("base_model"))
    if base:
        lines.append(f"base_model: {base}")
    lines.append(f"library_name: {library}")
    from stages.registry import model_task_of_manifest

    task = model_task_of_manifest(dict(manifest, stage=stage))  # from the stage registry
    if task:
        lines.append(f"pipeline_tag: {'text-classification' if task == 'seq_cls' else 'text-generation'}")
    tags = ["rlhf-suite", stage] + [t for t in (manifest.get("peft_method"),) if t and t != "full"]
    lines += ["tags:"] + [f"- {t}" for t in dict.fromkeys(tags)]
    hub_data = [s.get("source", "").split(" [")[0] for s in (manifest.get("data") or {}).get("sources", [])]
    hub_data = [d for d in hub_data if hub_model_id(d)]
    if hub_data:
        lines += ["datasets:"] + [f"- {d}" for d in dict.fromkeys(hub_data)]
    return lines + ["---", ""]


def data_section(data: dict) -> list[str]:
    if not data:
        return []
    rows = []
    for role, sources in (("train", data.get("sources", [])), ("eval", data.get("eval_sources", []))):
        for s in sources:
            dropped = sum((s.get("dropped_by_reason") or {}).values()) + (s.get("duplicates_removed") or 0)
            rows.append([f"`{s.get('source')}`", role, s.get("format", ""), s.get("rows_read", 0), s.get("rows_kept", 0),
                         dropped, f"`{str(s.get('fingerprint', ''))[:16]}`"])
    lines = ["## Data", "", f"Task `{data.get('task')}`: {data.get('train_size', 0)} training rows, "
             f"{data.get('eval_size', 0)} validation rows (split: {(data.get('split') or {}).get('rule', 'n/a')}).", ""]
    lines += table(["source", "role", "format", "rows read", "rows kept", "dropped", "fingerprint"], rows)
    fps = data.get("fingerprints") or {}
    lines += ["", f"Fingerprints: train `{fps.get('train') or data.get('train_fingerprint')}`, "
              f"eval `{fps.get('eval') or data.get('eval_fingerprint')}`.", ""]
    return lines


def hyperparameter_section(manifest: dict) -> list[str]:
    cfg = scrub(manifest.get("config") or {})
    training, model, policy = cfg.get("training") or {}, cfg.get("model") or {}, cfg.get("policy") or {}
    rows = [[f"`{k}`", training[k]] for k in HYPERPARAMETERS if training.get(k) not in (None, [], "")]
    method = manifest.get("peft_method") or policy.get("peft_method")
    for k in METHOD_KEYS.get(method, ()):
        v = model.get(k, policy.get(k))
        if v not in (None, [], ""):
            rows.append([f"`{k}`", v])
    rows = [[k, f"{v:g}" if isinstance(v, float) else v] for k, v in rows]
    if not rows:
        return []
    return ["## Training hyperparameters", ""] + table(["key", "value"], rows) + [""]


def _numeric(d: dict | None, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in (d or {}).items() if k.startswith(prefix) and isinstance(v, (int, float))
            and not isinstance(v, bool) and not any(n in k for n in NOISE)}


def metrics_section(metrics: dict) -> list[str]:
    if not metrics:
        return []
    final = _numeric(metrics.get("final"), "eval_")
    before_key = "base" if metrics.get("base") else "start" if metrics.get("start") else None
    before = _numeric(metrics.get(before_key), f"{before_key}_") if before_key else {}
    lines = ["## Results", ""]
    if final:
        what = {"base": "the starting model with adapters disabled (base)",
                "start": "the untrained starting point (start)"}.get(before_key, "")
        lines += ["Validation metrics at the end of training" + (f", compared with {what}:" if what else ":"), ""]
        label = before_key or "before"
        rows = [[f"`{k}`", before[k] if k in before else "", v,
                 f"{v - before[k]:+.4f}" if k in before else ""] for k, v in sorted(final.items())]
        lines += table(["metric", label, "final", "change"], rows) + [""]
    extra = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    extra |= {k: v for k, v in metrics.items() if isinstance(v, str) and k in ("reference",)}
    if extra:
        lines += [f"- `{k}`: {fmt(v)}" for k, v in sorted(extra.items())] + [""]
    for split, rep in sorted((metrics.get("lengths") or {}).items()):
        if rep:
            lines.append(f"- lengths ({split}): {rep.get('rows', 0)} rows, {rep.get('over_limit', 0)} over max_length, "
                         f"{rep.get('prompt_trimmed', 0)} prompts trimmed, {rep.get('response_cut', 0)} responses cut, "
                         f"{rep.get('dropped', 0)} dropped")
    return lines + [""] if len(lines) > 2 else []


def classification_section(manifest: dict) -> list[str]:
    """A classifier's held-out comparison (trained vs untrained head vs baselines) and per-class figures."""
    res = (manifest.get("metrics") or {}).get("classification") or {}
    if not res:
        return []
    lines = ["## Classification", "", f"Labels (id order): {', '.join(f'`{n}`' for n in manifest.get('labels') or [])}; "
             f"{'multi' if manifest.get('multi_label') else 'single'}-label"
             + (f", decision threshold {fmt(manifest['threshold'])} (tuned on validation; `pipeline` does not apply "
                "it: see labels.json)" if manifest.get("threshold") is not None else "") + ".", "",
             "Held-out (validation) comparison:", ""]
    rows = [[f"`{name}`", m["macro_f1"], m["micro_f1"], m["accuracy"], m["ece"]] for name, m in res.items() if m]
    lines += table(["model", "macro-F1", "micro-F1", "accuracy", "ECE"], rows) + [""]
    final = res.get("trained") or {}
    if final.get("per_class"):
        lines += ["Per class (trained):", ""]
        lines += table(["label", "precision", "recall", "F1", "support"],
                       [[f"`{k}`", v["precision"], v["recall"], v["f1"], v["support"]] for k, v in final["per_class"].items()])
        lines += ["", "Confusion matrices: `confusion_start.png`, `confusion_final.png` (and in metrics.json).", ""]
    return lines


def title_of(out_dir, stage: str) -> str:
    """The output's directory name (`.sft.work/staging` while save_artifact assembles `sft`)."""
    if out_dir is None:
        return stage
    p = Path(out_dir).resolve()
    m = re.fullmatch(r"\.(.+)\.work", p.parent.name)
    if p.name == "staging" and m:
        return m.group(1)
    return stage if p.name.startswith(".") else p.name


def render(manifest: dict, *, out_dir: Path | None = None, extra: str | None = None) -> str:
    """The model card text for a manifest."""
    m = scrub(manifest or {})
    stage = stage_name(m)
    is_adapter = out_dir is not None and (Path(out_dir) / "adapter_config.json").is_file()
    lines = front_matter(m, stage, "peft" if is_adapter else "transformers")
    lines += [f"# {title_of(out_dir, stage)}", "",
              f"A `{stage}` stage output of rlhf-suite (fingerprint `{m.get('fingerprint', 'n/a')}`)."]
    lines += ["", f"- Base model: `{m.get('base_model', 'unknown')}`"]
    t = m.get("trainable") or {}
    method = m.get("peft_method") or "unknown"
    if t:
        lines.append(f"- Method: `{method}`, {fmt(t.get('trainable_params'))} trainable of {fmt(t.get('total_params'))} "
                     f"parameters ({t.get('trainable_pct', 0):.4g}%)")
    else:
        lines.append(f"- Method: `{method}`")
    if m.get("merged_adapter"):
        lines.append(f"- Started from `{m['merged_adapter']}` with its adapter merged into the weights")
    chain = lineage(m)
    if chain:
        lines += ["", "## Lineage", "", "From the base model to this output:", ""]
        steps = [f"`{c['path']}` (base model)" if not c.get("stage") else
                 f"`{c['stage']}` ({c.get('peft_method') or '?'}) at `{c['path']}`, fingerprint `{c.get('fingerprint')}`"
                 for c in reversed(chain)]
        steps.append(f"`{stage}` ({method}): this output")
        lines += [f"{i}. {s}" for i, s in enumerate(steps, 1)]
    lines += [""] + data_section(m.get("data") or {}) + hyperparameter_section(m) + metrics_section(m.get("metrics") or {}) + classification_section(m)
    if m.get("command") or m.get("recipe_path"):
        lines += ["## Reproduce", ""]
        if m.get("recipe_path"):
            lines += [f"Recipe: `{m['recipe_path']}`", ""]
        if m.get("command"):
            lines += ["```bash", scrub_command(m["command"]), "```", ""]
    pk = m.get("packages") or {}
    if pk or m.get("git_commit"):
        lines += ["## Environment", "", f"rlhf-suite git commit: `{m.get('git_commit') or 'unknown'}`", ""]
        lines += table(["package", "version"], [[k, str(v)] for k, v in sorted(pk.items()) if v]) + [""]
    if extra:
        lines += [extra.rstrip(), ""]
    elif out_dir is not None:
        name = title_of(out_dir, stage)
        use = (f"rlhf predict {name} --input rows.jsonl --output preds.jsonl  # labels, scores, top-k"
               if stage == "classify" else f"rlhf chat {name}                        # talk to it in the terminal")
        lines += ["## Use", "", "```bash", use,
                  f"rlhf export {name} --out {name}-export  # a standalone model for transformers / vLLM / TGI",
                  "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_model_card(out_dir: str | Path, manifest: dict, *, extra: str | None = None) -> Path | None:
    """Write README.md into `out_dir` (called by save_artifact for every stage output, before the atomic rename)."""
    out = Path(out_dir)
    path = out / "README.md"
    path.write_text(render(manifest, out_dir=out, extra=extra), encoding="utf-8")
    return path
