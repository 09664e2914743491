"""Export a stage output as a standalone model directory that plain `transformers` (and vLLM/TGI) load.

    rlhf export runs/x/dpo --out exports/x-dpo
    python -m stages.export runs/x/dpo --out exports/x-dpo --dtype bfloat16 --push-to-hub me/x-dpo

LoRA, DoRA and IA3 adapters are merged into the base weights, through every merged parent stage
(stages.core.policy.load_model), in float32 on the unquantized base (a QLoRA adapter is merged into the
dequantized base, never into 4-bit weights), then cast to `--dtype`. Prefix/prompt tuning and bottleneck
adapters cannot be merged: they export as `base/` (standalone) + `adapter/` with a note in README.md.
The output holds safetensors weights, the tokenizer with its chat template, a config without
quantization_config, and a model card; it is written to a temporary directory and renamed into place.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # `python stages/export.py` runs this file as a script
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from stages.core import stage as S  # noqa: E402
from stages.core.errors import ConfigError, ModelError, UserError  # noqa: E402

STAGE = "export"
MERGEABLE = ("LORA", "IA3")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PICKLED = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
BOTTLENECK_NOTE = ("This is a bottleneck adapter (rlhf-suite's own PEFT type): `import stages.core.bottleneck` "
                   "before `PeftModel.from_pretrained`, or PEFT fails with KeyError: 'BOTTLENECK'.")


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def adapter_config(path) -> dict | None:
    return read_json(Path(path) / "adapter_config.json") if Path(path).is_dir() else None


def adapter_type(path) -> str | None:
    cfg = adapter_config(path)
    return str(cfg.get("peft_type", "")).upper() if cfg else None


def task_of(path) -> str:
    """causal_lm, or seq_cls for a reward model (adapter task type, manifest or config architecture)."""
    p = Path(path)
    from stages.registry import model_task_of_manifest

    acfg, man, cfg = adapter_config(p), read_json(p / "manifest.json"), read_json(p / "config.json")
    if model_task_of_manifest(man):
        return model_task_of_manifest(man)
    if (acfg or {}).get("task_type") == "SEQ_CLS":
        return "seq_cls"
    if any(a.endswith("ForSequenceClassification") for a in (cfg or {}).get("architectures") or []):
        return "seq_cls"
    return "causal_lm"


def adapter_base(path) -> str:
    """An adapter's base_model_name_or_path; a relative path (an export's `../base`) is taken from the adapter dir."""
    base = adapter_config(path)["base_model_name_or_path"]
    if base.startswith(("./", "../")) and (Path(path) / base).is_dir():
        return str((Path(path) / base).resolve())
    return base


def unmergeable_base(path) -> str:
    """The model a non-mergeable adapter runs on. A later stage that trained the same adapter further records the
    earlier adapter output as its base: that adapter is superseded, so follow on to the model beneath it."""
    base = adapter_base(path)
    while adapter_type(base) not in (None, *MERGEABLE):
        base = adapter_base(base)
    return base


def root_model(path) -> str:
    """The first base model under a chain of adapter outputs."""
    while adapter_config(path):
        path = adapter_base(path)
    return str(path)


def resolve_dtype(name: str, path):
    """`auto`: the dtype the original base model was stored in (float32 when unknown)."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(root_model(path))
        d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        d = getattr(torch, d) if isinstance(d, str) else d
        return d if d in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    except Exception:
        return torch.float32


def load_tokenizer(path):
    from stages.core.models import load_tokenizer as _load

    return _load(str(path))


def num_labels_of(path) -> int:
    """A classifier's label count (its labels.json, written by the classify stage); 1 for a reward model."""
    info = read_json(Path(path) / "labels.json") if Path(path).is_dir() else None
    return len(info["labels"]) if info else 1


def load_base(name: str, task: str, dtype, num_labels: int = 1):
    """A plain (unquantized) model; a mergeable adapter output is merged into its base, recursively."""
    from stages.core.policy import load_model

    model, _, _ = load_model(name, task=task, dtype=dtype, num_labels=num_labels)
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        raise ModelError(f"{root_model(name)} is stored quantized; an export needs the unquantized base weights "
                         "(point the adapter's base_model_name_or_path at the original 16/32-bit model)")
    return model


def load_for_inference(path, *, task: str | None = None, dtype=None):
    """(model, kind): mergeable adapters merged ("merged"), full models as is ("model"), others as base+adapter."""
    import torch

    dtype = dtype or torch.float32
    task = task or task_of(path)
    ptype, n = adapter_type(path), num_labels_of(path)
    if ptype is None:
        return load_base(str(path), task, dtype, n), "model"
    if ptype in MERGEABLE:
        return load_base(str(path), task, dtype, n), "merged"
    from peft import PeftModel

    from stages.core import bottleneck  # noqa: F401  (registers the bottleneck adapter type)
    from stages.core.models import sync_model_special_tokens

    base = load_base(unmergeable_base(path), task, dtype, n)
    sync_model_special_tokens(base, load_tokenizer(path))  # an adapter saved after adding a pad token
    return PeftModel.from_pretrained(base, str(path)), "base+adapter"


def _clean_config(directory: Path) -> None:
    cfg_path = directory / "config.json"
    cfg = read_json(cfg_path)
    if cfg is not None and "quantization_config" in cfg:
        cfg.pop("quantization_config")
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for f in directory.rglob("*"):
        if f.suffix in PICKLED:
            f.unlink()


def save_standalone(model, tokenizer, directory: Path, dtype) -> None:
    """Weights (safetensors) + tokenizer/chat template + configs with matching special-token ids."""
    from stages.core.models import sync_model_special_tokens

    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(dtype)
    sync_model_special_tokens(model, tokenizer)
    model.config.use_cache = True  # stages train with the cache off; inference wants it on
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    _clean_config(directory)


def export_model(src, dst, *, merge: bool = True, dtype: str = "auto") -> dict:
    """Write the export of stage output `src` into the (empty or new) directory `dst`; returns what was done."""
    import torch

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    task, ptype, torch_dtype = task_of(src), adapter_type(src), resolve_dtype(dtype, src)
    tokenizer = load_tokenizer(src)
    info = {"source": str(src.resolve()), "task": task, "peft_type": ptype, "dtype": str(torch_dtype).split(".")[-1]}
    labels = read_json(src / "labels.json")  # a classifier: label names, task and threshold travel with it
    n = len(labels["labels"]) if labels else 1
    if ptype is None or (ptype in MERGEABLE and merge):
        model = load_base(str(src), task, torch.float32, n)
        _with_labels(model, labels, dst)
        save_standalone(model, tokenizer, dst, torch_dtype)
        return info | {"kind": "merged" if ptype else "full", "note": None}
    # base + adapter: the adapter cannot (or was asked not to) be merged
    base_name = unmergeable_base(src) if ptype not in MERGEABLE else adapter_base(src)
    base = load_base(base_name, task, torch.float32, n)
    _with_labels(base, labels, dst / "base")
    save_standalone(base, tokenizer, dst / "base", torch_dtype)
    adir = dst / "adapter"
    adir.mkdir()
    for f in src.iterdir():
        if f.name.startswith("adapter_model") and f.suffix == ".safetensors":
            shutil.copy2(f, adir / f.name)
    if not any(adir.glob("adapter_model*.safetensors")):
        raise ModelError(f"{src}: no adapter_model.safetensors to export")
    acfg = adapter_config(src)
    acfg["base_model_name_or_path"] = "../base"  # relative to adapter/ (rlhf chat resolves it); see the README
    (adir / "adapter_config.json").write_text(json.dumps(acfg, indent=2) + "\n")
    tokenizer.save_pretrained(str(adir))
    why = "was exported unmerged (--no-merge)" if ptype in MERGEABLE else "cannot be merged into the weights"
    note = (f"The {ptype} adapter {why}: `base/` is a standalone model, `adapter/` the PEFT adapter to apply "
            "on it. Plain transformers loading `base/` alone gives the model WITHOUT the adapter's training.")
    if ptype == "BOTTLENECK":
        note += " " + BOTTLENECK_NOTE
    return info | {"kind": "base+adapter", "note": note}


def _with_labels(model, labels: dict | None, directory: Path) -> None:
    """A classifier's id2label/label2id/problem_type on the config, labels.json (with the threshold) beside it."""
    if labels is None:
        return
    from stages.core.classify_model import apply_label_config

    apply_label_config(model, labels)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")


def usage_section(info: dict, repo: str | None = None) -> str:
    """The export part of the model card: what was exported and how to load it."""
    where = repo or "PATH"
    cls = "AutoModelForSequenceClassification" if info["task"] == "seq_cls" else "AutoModelForCausalLM"
    lines = ["## Export", "", f"Exported by `rlhf export` from `{info['source']}` as **{info['kind']}** "
             f"(weights in {info['dtype']}, safetensors only)."]
    if info["kind"] == "base+adapter":
        imp = "import stages.core.bottleneck  # registers the BOTTLENECK adapter type\n" if info["peft_type"] == "BOTTLENECK" else ""
        lines += ["", f"**Note:** {info['note']}", "", "```python", f"{imp}from peft import PeftModel",
                  f"from transformers import AutoTokenizer, {cls}", "",
                  f'base = {cls}.from_pretrained("{where}/base")',
                  f'model = PeftModel.from_pretrained(base, "{where}/adapter")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{where}/adapter")', "```"]
    else:
        lines += ["", "A standalone model: no adapter and no rlhf-suite needed (transformers, vLLM, TGI).", "",
                  "```python", f"from transformers import AutoTokenizer, {cls}", "",
                  f'model = {cls}.from_pretrained("{where}")', f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
                  "```"]
    return "\n".join(lines) + "\n"


def push_to_hub(folder, repo_id: str, *, private: bool = False) -> str:
    """Upload an export with huggingface_hub; the token comes from the environment (HF_TOKEN) or the user's login."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise UserError(f"--push-to-hub: HF_HUB_OFFLINE is set; unset it to upload (the export is at {folder})")
    from huggingface_hub import HfApi

    api = HfApi(token=os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None)
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message="Upload model exported with rlhf-suite")
    except Exception as e:  # auth, network, permissions: one line, the export stays
        msg = " ".join(str(e).split())
        raise UserError(f"--push-to-hub {repo_id} failed ({type(e).__name__}: {msg}); the export is at {folder}") from None
    return str(getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}")


def check_source(path: str) -> tuple[Path, dict]:
    src = Path(path).expanduser()
    if not src.is_dir():
        raise ModelError(f"{path}: not a directory; expected a stage output such as runs/x/sft")
    manifest = read_json(src / "manifest.json")
    if manifest is not None and manifest.get("status") != "complete":
        raise ModelError(f"{path}: the stage did not complete (manifest status {manifest.get('status')!r})")
    if manifest is None and not ((src / "adapter_config.json").is_file() or (src / "config.json").is_file()):
        raise ModelError(f"{path}: neither a stage output (manifest.json) nor a model or adapter directory")
    return src.resolve(), manifest or {}


def check_target(out: Path, force: bool, src: Path | None = None) -> None:
    """--force replaces only a previous export (one with export.json), never the source or a folder holding it."""
    if out.is_symlink():
        raise ConfigError(f"--out {out}: is a symbolic link; give the real directory")
    out = out.resolve()
    if src is not None and (out == src or out in src.parents):
        raise ConfigError(f"--out {out}: contains the stage output {src}; choose another directory")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "export.json").is_file():
            raise ConfigError(f"--out {out}: holds files that are not an export (no export.json); nothing there is "
                              "touched: choose another directory")
        if not force:
            raise ConfigError(f"--out {out}: holds a previous export; pass --force to replace it")


def replace_dir(tmp: Path, out: Path) -> None:
    """Swap `tmp` into `out` (atomic rename; a previous `out` is removed only once the new one is in place)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rlhf export", description="Export a stage output as a standalone model.")
    p.add_argument("run", metavar="RUN/STAGE", help="a finished stage output directory, e.g. runs/x/dpo")
    p.add_argument("--out", required=True, help="the export directory (must be empty or absent unless --force)")
    p.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True,
                   help="merge LoRA/DoRA/IA3 into the weights (default); --no-merge keeps base + adapter")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (auto: the base model's)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--push-to-hub", dest="push_to_hub", metavar="REPO", help="upload to this Hub repo (token: HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    from stages.core.modelcard import write_model_card

    args = parse(argv)
    src, manifest = check_source(args.run)
    out = Path(args.out).expanduser().resolve()
    if out == src or src in out.parents:
        raise ConfigError(f"--out {out}: must not be inside the stage output {src}")
    check_target(out, args.force, src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        tmp.chmod(0o755)
        S.log(STAGE, f"exporting {src} ({adapter_type(src) or 'full model'})")
        info = export_model(src, tmp, merge=args.merge, dtype=args.dtype)
        write_model_card(tmp, manifest, extra=usage_section(info, args.push_to_hub))
        (tmp / "export.json").write_text(json.dumps(info, indent=2) + "\n")
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    S.log(STAGE, f"wrote {out} ({info['kind']}, {info['dtype']})")
    if info["note"]:
        S.log(STAGE, f"note: {info['note']}")
    if args.push_to_hub:
        S.log(STAGE, f"uploaded to {push_to_hub(out, args.push_to_hub, private=args.private)}")
    return out


def cli(argv=None) -> int:
    return S.run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
