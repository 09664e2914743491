"""The bench's real-length workers (tests/bench/workload.py rows): our SFT, reward and DPO stages against plain
TRL on the same rows. Split from workers.py, whose measurement helpers they use; workers.WORKERS lists them."""
from __future__ import annotations

import json
from pathlib import Path

from workers import RECIPES, StepTimer, common_overrides, cpu_kw, lora_config, patch_stage_callbacks

# SFT at max_length 512, batch 4; RM batch 8 and DPO batch 4 at 384
REAL = {"sft": {"max_length": 512, "batch": 4}, "rm": {"max_length": 384, "batch": 8}, "dpo": {"max_length": 384, "batch": 4}}
# our SFT stage with one default turned off at a time: what each default contributes
SFT_VARIANTS = {"sft-real": [], "sft-real-no-compact-head": ["--compact_lm_head", "false"],
                "sft-real-no-bf16-weights": ["--bf16_frozen_weights", "false"],
                "sft-real-no-grouping": ["--group_by_length", "false"],
                "sft-real-no-checkpointing": ["--gradient_checkpointing", "false"],
                "sft-real-return-freed-memory": ["--return_freed_memory", "true"]}


def real_rows(spec, kind: str) -> str:
    from workload import instruction_rows, preference_rows

    path = Path(spec["tmp"]) / f"real-{kind}.jsonl"
    # SFT: exactly one epoch of the measured steps, so a length-grouped order and TRL's random order train on
    # the same rows (with more rows, grouping's longest-first window would see longer rows than TRL's sample)
    rows = (instruction_rows(spec["steps"] * REAL["sft"]["batch"]) if kind == "sft"
            else preference_rows(spec.get("real_pairs", 256)))
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def real_overrides(spec, kind: str) -> list[str]:
    r = REAL[kind]
    return ["--datasets", real_rows(spec, "sft" if kind == "sft" else "pref"), "--max_length", str(r["max_length"]),
            "--per_device_train_batch_size", str(r["batch"]), *common_overrides(Path(spec["tmp"]) / "out", spec["steps"])]


def w_stage_real(spec, stage: str, kind: str, passes: float, extra: tuple = ()) -> dict:
    """Our stage as users run it, on the real-length rows (`kind`: which REAL shape and data)."""
    import importlib

    timer = StepTimer()
    patch_stage_callbacks(timer)
    importlib.import_module(f"stages.{stage}").main(
        ["--config", str(RECIPES / f"{stage}.yaml"), "--model_name_or_path", spec["model"],
         *(["--compare_with_base", "false"] if stage == "sft" else []), *real_overrides(spec, kind), *extra])
    return timer.summary(passes=passes)


def w_sft_real_trl(spec) -> dict:
    """Plain TRL on the real-length rows: SFTTrainer with its defaults (bf16, gradient checkpointing, padded)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from stages.core.models import resolve_model

    timer = StepTimer()
    rows = [json.loads(line) for line in Path(real_rows(spec, "sft")).read_text().splitlines()]
    cfg = SFTConfig(output_dir=str(Path(spec["tmp"]) / "out"), max_steps=spec["steps"], max_length=REAL["sft"]["max_length"],
                    per_device_train_batch_size=REAL["sft"]["batch"], learning_rate=2e-4, logging_steps=1,
                    save_strategy="no", report_to="none", seed=0, **cpu_kw())
    trainer = SFTTrainer(model=resolve_model(spec["model"]), args=cfg, train_dataset=Dataset.from_list(rows),
                         peft_config=lora_config("sft.yaml"), callbacks=[timer])
    trainer.train()
    return timer.summary(passes=2.0)


def _suite_encoded_pairs(spec, layout: str, path: str):
    """The pairs as our stages feed TRL: tokenised and truncated by the suite's rule (TRL's RewardTrainer
    would drop long pairs instead), so both sides train on identical rows."""
    from datasets import Dataset

    from stages.core.encode import encode_preference
    from stages.core.models import load_tokenizer, resolve_model

    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    tokenizer = load_tokenizer(resolve_model(spec["model"]))
    ds, _ = encode_preference(Dataset.from_list(rows), tokenizer, max_length=REAL["rm"]["max_length"], layout=layout)
    return ds, tokenizer


def w_rm_real_trl(spec) -> dict:
    """Plain TRL RewardTrainer (its defaults) on the same pre-truncated pairs, with the same LoRA."""
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from stages.core.models import resolve_model

    ds, tokenizer = _suite_encoded_pairs(spec, "pair", real_rows(spec, "pref"))
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model(spec["model"]), num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    lora = lora_config("rm.yaml")
    lora = LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout, target_modules="all-linear",
                      task_type="SEQ_CLS")
    timer = StepTimer()
    cfg = RewardConfig(output_dir=str(Path(spec["tmp"]) / "out"), max_steps=spec["steps"],
                       max_length=REAL["rm"]["max_length"], per_device_train_batch_size=REAL["rm"]["batch"],
                       learning_rate=2e-4, logging_steps=1, save_strategy="no", report_to="none", seed=0, **cpu_kw())
    trainer = RewardTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tokenizer, peft_config=lora,
                            callbacks=[timer])
    trainer.train()
    return timer.summary(passes=2.0)


def w_dpo_real_trl(spec) -> dict:
    """Plain TRL DPOTrainer with a separate reference model on the same pre-truncated pairs."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from stages.core.models import resolve_model, sync_model_special_tokens

    ds, tokenizer = _suite_encoded_pairs(spec, "dpo", real_rows(spec, "pref"))
    path = resolve_model(spec["model"])
    models = []
    for _ in range(2):
        m = AutoModelForCausalLM.from_pretrained(path)
        if len(tokenizer) > m.get_input_embeddings().num_embeddings:
            m.resize_token_embeddings(len(tokenizer))
        sync_model_special_tokens(m, tokenizer)
        models.append(m)
    class PreTokenizedDPOTrainer(DPOTrainer):  # TRL would re-tokenise (and cut long pairs its own way)
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    timer = StepTimer()
    cfg = DPOConfig(output_dir=str(Path(spec["tmp"]) / "out"), max_steps=spec["steps"], max_length=REAL["dpo"]["max_length"],
                    per_device_train_batch_size=REAL["dpo"]["batch"], learning_rate=1e-4, logging_steps=1,
                    save_strategy="no", report_to="none", seed=0, **cpu_kw())
    trainer = PreTokenizedDPOTrainer(model=get_peft_model(models[0], lora_config("dpo.yaml")), ref_model=models[1], args=cfg,
                         train_dataset=ds, processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return timer.summary(passes=3.0)
