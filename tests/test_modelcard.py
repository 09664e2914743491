"""Model cards: the numbers of the manifest, the lineage back to the base, front matter, and no secrets."""
import json
from pathlib import Path

import yaml

from stages.core import modelcard

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_" + "s3cr3t" * 6


def front(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def dpo_manifest(tmp_path):
    """A DPO output on an SFT output on a Hub base model, with manifests on disk for the lineage."""
    sft = tmp_path / "runs" / "sft"
    sft.mkdir(parents=True)
    (sft / "manifest.json").write_text(json.dumps({
        "status": "complete", "stage": "sft", "fingerprint": "sftfp123", "peft_method": "lora",
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "parent": {"path": "HuggingFaceTB/SmolLM2-135M-Instruct", "stage": None, "fingerprint": None}}))
    return {
        "fingerprint": "dpofp456", "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "method": "dpo",
        "parent": {"path": str(sft), "stage": "sft", "fingerprint": "sftfp123"},
        "merged_adapter": str(sft), "peft_method": "lora",
        "trainable": {"trainable_params": 1843200, "total_params": 136358016, "trainable_pct": 1.3517},
        "config": {"training": {"learning_rate": 5e-7, "num_train_epochs": 2, "max_steps": -1, "beta": 0.1,
                                "loss_type": ["sigmoid"], "per_device_train_batch_size": 8, "max_length": 512,
                                "gradient_accumulation_steps": 2, "hub_token": SECRET, "seed": 0},
                   "model": {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "lora_target_modules": "all-linear"},
                   "policy": {"peft_method": "lora"}, "run": {"license": "apache-2.0", "api_key": SECRET}},
        "data": {"task": "preference", "train_size": 900, "eval_size": 100, "split": {"rule": "fraction 0.1"},
                 "sources": [{"source": "Anthropic/hh-rlhf [train]", "format": "chosen_rejected", "rows_read": 1200,
                              "rows_kept": 1000, "dropped_by_reason": {"empty": 150}, "duplicates_removed": 50,
                              "fingerprint": "abcdef0123456789ffff"}],
                 "eval_sources": [],
                 "fingerprints": {"train": "trainfp999", "eval": "evalfp888"}},
        "metrics": {"start": {"start_loss": 0.6931, "start_rewards/accuracies": 0.5, "start_runtime": 3.2},
                    "final": {"eval_loss": 0.4123, "eval_rewards/accuracies": 0.8125, "eval_runtime": 3.1, "epoch": 2.0},
                    "reference": "sft policy (adapters disabled)"},
        "command": f"stages/dpo.py --config recipes/x/dpo.yaml --hub_token {SECRET} --api-key={SECRET}",
        "recipe_path": "recipes/x/dpo.yaml",
        "packages": {"torch": "2.13.0", "transformers": "5.24.0", "trl": "1.16.0", "peft": "0.21.2"},
        "git_commit": "0123abcd",
    }


def test_card_holds_the_manifest_numbers_and_lineage(tmp_path):
    manifest = dpo_manifest(tmp_path)
    out = tmp_path / "runs" / "dpo"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    modelcard.write_model_card(out, manifest)
    text = (out / "README.md").read_text()
    meta = front(text)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert meta["tags"][:2] == ["rlhf-suite", "dpo"] and meta["library_name"] == "peft"
    assert meta["datasets"] == ["Anthropic/hh-rlhf"]
    # lineage: base -> sft -> this dpo output, in that order
    i_base, i_sft, i_dpo = (text.index(s) for s in ("(base model)", "`sft` (lora)", "`dpo` (lora): this output"))
    assert i_base < i_sft < i_dpo and "sftfp123" in text and "dpofp456" in text
    # data: rows read/kept, dropped, fingerprints
    assert "| `Anthropic/hh-rlhf [train]` | train | chosen_rejected | 1,200 | 1,000 | 200 | `abcdef0123456789` |" in text
    assert "trainfp999" in text and "evalfp888" in text and "900 training rows" in text
    # method and trainable share; hyperparameters
    assert "1,843,200 trainable of 136,358,016" in text and "1.352%" in text
    for row in ("| `learning_rate` | 5e-07 |", "| `beta` | 0.1 |", "| `loss_type` | sigmoid |", "| `max_length` | 512 |",
                "| `per_device_train_batch_size` | 8 |", "| `lora_r` | 16 |"):
        assert row in text, row
    # start -> final comparison, without runtime noise
    assert "| `loss` | 0.6931 | 0.4123 | -0.2808 |" in text
    assert "| `rewards/accuracies` | 0.5000 | 0.8125 | +0.3125 |" in text
    assert "runtime" not in text and "sft policy (adapters disabled)" in text
    # reproduce, environment
    assert "Recipe: `recipes/x/dpo.yaml`" in text and "stages/dpo.py --config recipes/x/dpo.yaml" in text
    assert "`0123abcd`" in text and "| trl | 1.16.0 |" in text


def test_no_secret_reaches_the_card(tmp_path):
    text = modelcard.render(dpo_manifest(tmp_path))
    assert SECRET not in text and "s3cr3t" not in text
    assert text.count("hub_token") == 1 and "api_key" not in text  # only the masked flag in the command
    assert "--hub_token ***" in text and "--api-key=***" in text
    assert modelcard.scrub({"a": {"auth_token": 1, "pad_token": "<p>", "mean_token_accuracy": 0.5, "db_password": 2}}) == \
        {"a": {"pad_token": "<p>", "mean_token_accuracy": 0.5}}


def test_sft_card_compares_with_the_base_and_local_bases_stay_out_of_front_matter(tmp_path):
    m = {"base_model": str(tmp_path), "peft_method": "full", "command": "/usr/bin/rlhf sft --config r.yaml",
         "metrics": {"base": {"base_loss": 2.5, "base_mean_token_accuracy": 0.25},
                     "final": {"eval_loss": 1.75, "eval_mean_token_accuracy": 0.5}, "best_eval_loss": 1.7}}
    text = modelcard.render(m)
    meta = front(text)
    assert "base_model" not in meta and meta["tags"] == ["rlhf-suite", "sft"]  # stage inferred from the command
    assert "| `loss` | 2.5000 | 1.7500 | -0.7500 |" in text and "| `mean_token_accuracy` | 0.2500 | 0.5000 | +0.2500 |" in text
    assert "with adapters disabled (base)" in text and "`best_eval_loss`: 1.7000" in text


def test_builtin_alias_maps_to_its_hub_id():
    text = modelcard.render({"base_model": "smollm2-135m-instruct", "stage": "rm"})
    assert front(text)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_real_tiny_sft_output_carries_its_card(tiny_llama, tmp_path):
    from stages import sft

    out = tmp_path / "runs" / "sft"
    sft.main(["--config", str(ROOT / "recipes/tiny/sft.yaml"), "--model_name_or_path", str(tiny_llama),
              "--output_dir", str(out)])
    m = json.loads((out / "manifest.json").read_text())
    text = (out / "README.md").read_text()
    meta = front(text)
    assert meta["tags"] == ["rlhf-suite", "sft", "lora"] and meta["library_name"] == "peft"
    assert text.splitlines()[text.splitlines().index("---", 1) + 2] == "# sft"  # named after the output, not staging
    base, final = m["metrics"]["base"]["base_loss"], m["metrics"]["final"]["eval_loss"]
    assert f"| `loss` | {base:.4f} | {final:.4f} | {final - base:+.4f} |" in text
    src = m["data"]["sources"][0]
    assert f"| `{src['source']}` | train | {src['format']} | {src['rows_read']} | {src['rows_kept']} |" in text
    assert m["data"]["fingerprints"]["train"] in text
    assert f"{m['trainable']['trainable_params']:,} trainable" in text
    assert "| `learning_rate` | 0.005 |" in text and "| `max_steps` | 6 |" in text
    assert m["command"] in text and m["recipe_path"] in text and m["packages"]["peft"] in text
    assert str(tiny_llama) in text


def test_pipeline_tag_comes_from_the_stage_registry():
    assert front(modelcard.render({"stage": "rm", "status": "complete"}))["pipeline_tag"] == "text-classification"
    assert front(modelcard.render({"stage": "dpo", "status": "complete"}))["pipeline_tag"] == "text-generation"
    assert "pipeline_tag" not in front(modelcard.render({"status": "complete"}))  # not a suite stage: no claim
