"""What a stage's result depends on, fingerprinted from content before any model loads.

Components: the recipe values the user set (recipe + command line, minus paths to outputs and machine
choices), the data rows' content, the chat template's content, the parent model (a suite output's
manifest fingerprint, a local model's file contents, a Hub id's revision), the reward model and the
source of rule-reward/verifier modules where a stage uses them. Choices the stage derives from the
machine (threads, precision, gradient checkpointing by free RAM, padding_free by CUDA,
precompute_ref_log_probs by world size) are recorded in the manifest but are not part of it, so the
same recipe is "unchanged" on a busier or different machine.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from . import artifacts

# never part of a fingerprint: where things are written, how they are shown, what the machine decided
VOLATILE = {"output_dir", "logging_dir", "resume_from_checkpoint", "report_to", "disable_tqdm", "force",
            "keep_checkpoints", "num_threads", "memory_budget_gb", "return_freed_memory", "logging_steps", "logging_first_step", "push_to_hub",
            "hub_token", "hub_model_id", "dataloader_num_workers", "save_total_limit", "run_name", "use_cpu", "verbose",
            # where the rollout server runs and how long to wait for it (use_vllm and vllm_mode do count)
            "vllm_server_base_url", "vllm_server_host", "vllm_server_port", "vllm_server_timeout", "vllm_executable",
            "vllm_gpu_memory_utilization"}
# paths whose content (not their name) is what counts: replaced by a content key
MODEL_KEYS = ("model_name_or_path", "reward_model")
CONTENT_KEYS = ("chat_template",)


def _hash_cache() -> Path:
    from .models import cache_dir

    return cache_dir() / "content_hashes.json"


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes, cached under (path, size, mtime) so a large model is hashed once."""
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    cache_file = _hash_cache()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()[:32]
    if st.st_size > (1 << 20):  # small files are cheaper to hash than to look up
        cache[key] = digest
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=".content_hashes.")
            with os.fdopen(fd, "w") as f:
                json.dump(cache, f)
            os.replace(tmp, cache_file)
        except OSError:
            pass
    return digest


def dir_content_key(path: Path) -> str:
    """A content key of a model directory: every file's name and bytes (checkpoints and logs excluded)."""
    parts = []
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if rel.parts[0] in ("logs", "runs") or rel.name.startswith("."):
            continue
        parts.append((str(rel), file_hash(f)))
    return artifacts.fingerprint(parts)


def model_key(name: str | None, revision: str | None = None) -> str | None:
    """A suite output's own fingerprint; a local model's content; an alias's name; a Hub id with its revision."""
    if not name:
        return None
    p = Path(str(name)).expanduser()
    if p.is_dir():
        m = artifacts.read_manifest(p)
        if m and m.get("fingerprint"):
            return f"suite:{m['fingerprint']}"
        return f"dir:{dir_content_key(p)}"
    if p.is_file():
        return f"file:{file_hash(p)}"
    from .models import ALIASES

    if name in ALIASES:
        return f"alias:{name}"
    return f"hub:{name}@{revision or 'main'}"


def text_or_file_key(value: str | None) -> str | None:
    """A chat template given as a string or as a path to a .jinja file: its content."""
    if not value:
        return None
    p = Path(str(value)).expanduser()
    text = p.read_text() if p.is_file() else str(value)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def reward_source_key(spec) -> str | None:
    """Rule rewards and the verifier are code: their module source is an input."""
    if not spec:
        return None
    import importlib.util

    sources = []
    for module in ("reward.rules", "stages.core.demo"):
        found = importlib.util.find_spec(module)
        if found and found.origin:
            sources.append(Path(found.origin).read_text())
    text = json.dumps(spec, sort_keys=True, default=str)
    for word in text.replace('"', " ").replace(",", " ").split():  # a spec may point at a file or a module:function
        p = Path(word.split(":")[0])
        if p.suffix in (".py", ".yaml", ".yml", ".json") and p.is_file():
            sources.append(p.read_text())
        elif ":" in word and word.split(":")[0].replace(".", "").replace("_", "").isalnum():
            try:
                found = importlib.util.find_spec(word.split(":")[0])
            except (ImportError, ValueError):
                found = None
            if found and found.origin and Path(found.origin).is_file():
                sources.append(Path(found.origin).read_text())
    return artifacts.fingerprint([text, *sources])


def stage_components(stage: str, args, data_report: dict | None) -> dict:
    """The named inputs of a TRL-style stage (ParsedArgs), each JSON-serialisable."""
    values = {}
    for group in args.groups.values():
        for key in args.explicit:
            if hasattr(group, key) and key not in VOLATILE:
                v = getattr(group, key)
                v = getattr(v, "value", v)  # enums
                try:
                    json.dumps(v)
                except TypeError:
                    v = str(v)
                values[key] = v
    comps = {"stage": stage}
    revision = getattr(args.model, "model_revision", None)
    for key in MODEL_KEYS:
        if key in values:
            comps[key] = model_key(values.pop(key), revision if key == "model_name_or_path" else None)
    extra_rms = getattr(getattr(args, "training", None), "extra_reward_models", None)
    if extra_rms:  # `reward_model: [a, b]`: every ensemble member counts by content
        comps["reward_model"] = [comps.get("reward_model")] + [model_key(p, None) for p in extra_rms]
    for key in CONTENT_KEYS:
        if key in values:
            comps[key] = text_or_file_key(values.pop(key))
    if "reward" in values:
        comps["reward_code"] = reward_source_key(values["reward"])
    gold = values.get("gold_judge")
    if gold:  # a second reward model counts by content, a rule judge by its code, like the training reward
        comps["gold_judge"] = (model_key(values.pop("gold_judge"), None) if isinstance(gold, str) and Path(gold).is_dir()
                               else reward_source_key(gold))
    from .secrets import scrub

    comps["config"] = scrub(values)
    comps["data"] = (data_report or {}).get("fingerprints")
    return comps


def of(components: dict) -> str:
    return artifacts.fingerprint(components)


def changed(old: dict | None, new: dict) -> list[str]:
    """Readable names of what differs between two component dicts (config keys by name)."""
    if not old:
        return ["no recorded inputs (written before fingerprints were recorded per checkpoint)"]
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "config" and isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    out.append(f"{k} ({a.get(k)!r} -> {b.get(k)!r})")
        else:
            out.append({"data": "data content", "model_name_or_path": "starting model",
                        "chat_template": "chat template content", "reward_code": "reward/verifier code"}.get(key, key))
    return out
