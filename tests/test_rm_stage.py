"""Reward-model stage on tiny models: learns a decidable preference, truncates instead of dropping."""
import json
from pathlib import Path

from safetensors import safe_open

from stages import rm
from synthetic import preference_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes/tiny/rm.yaml")


def run_rm(model, out, data, evals, *extra):
    return rm.main(["--config", TINY, "--model_name_or_path", str(model), "--output_dir", str(out),
                    "--datasets", data, "--eval_datasets", evals, *extra])


def test_full_reward_model_learns_held_out_pairs(tiny_llama, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", preference_rows(96, seed=0))
    held = write_jsonl(tmp_path / "held.jsonl", preference_rows(32, seed=1))
    out = tmp_path / "rm"
    run_rm(tiny_llama, out, train, held)
    m = json.loads((out / "manifest.json").read_text())
    start, final = m["metrics"]["start"]["start_accuracy"], m["metrics"]["final"]["eval_accuracy"]
    assert start < 0.9, start  # the untrained head does not already know the preference
    assert final >= 0.9 and final > start, (start, final)
    assert (out / "model.safetensors").is_file()


def test_lora_reward_model_saves_its_score_head(tiny_qwen2, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", preference_rows(48, seed=0))
    held = write_jsonl(tmp_path / "held.jsonl", preference_rows(16, seed=1))
    out = tmp_path / "rm"
    run_rm(tiny_qwen2, out, train, held, "--peft_method", "lora", "--lora_r", "4", "--num_train_epochs", "1")
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert any("score" in k for k in f.keys())


def test_long_pairs_are_truncated_and_counted_not_dropped(tiny_llama, tmp_path):
    rows = preference_rows(24, seed=0)
    for r in rows[:5]:
        r["prompt"] = "context " * 150 + r["prompt"]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    held = write_jsonl(tmp_path / "held.jsonl", preference_rows(8, seed=1))
    out = tmp_path / "rm"
    run_rm(tiny_llama, out, train, held, "--max_length", "64", "--num_train_epochs", "1")
    m = json.loads((out / "manifest.json").read_text())
    lengths = m["metrics"]["lengths"]["train"]
    assert lengths["prompt_trimmed"] == lengths["over_limit"] >= 4 and lengths["dropped"] == 0
    assert lengths["rows"] == m["data"]["train_size"]


def _collated_lengths(monkeypatch):
    from trl.trainer import reward_trainer

    seen = []
    original = reward_trainer.DataCollatorForPreference.torch_call

    def recording(self, examples):
        batch = original(self, examples)
        seen.append(batch["input_ids"].shape[1])
        return batch

    monkeypatch.setattr(reward_trainer.DataCollatorForPreference, "torch_call", recording)
    return seen


def test_cpu_batches_are_padded_to_a_multiple_of_32_unless_the_recipe_says(tiny_llama, tmp_path, monkeypatch):
    """Fewer distinct tensor sizes keep glibc's heap from fragmenting (real pairs: 2.5 -> 1.8 GB peak)."""
    train = write_jsonl(tmp_path / "train.jsonl", preference_rows(16, seed=0))
    held = write_jsonl(tmp_path / "held.jsonl", preference_rows(4, seed=1))
    seen = _collated_lengths(monkeypatch)
    run_rm(tiny_llama, tmp_path / "default", train, held, "--max_steps", "2", "--save_strategy", "no")
    assert seen and all(n % 32 == 0 for n in seen), seen
    manifest = json.loads((tmp_path / "default" / "manifest.json").read_text())
    assert manifest["config"]["training"]["pad_to_multiple_of"] == 32
    seen.clear()
    run_rm(tiny_llama, tmp_path / "explicit", train, held, "--max_steps", "2", "--save_strategy", "no",
           "--pad_to_multiple_of", "7")
    assert seen and all(n % 7 == 0 for n in seen) and any(n % 32 for n in seen), seen


def test_padding_to_a_multiple_of_32_leaves_the_rewards_unchanged(tiny_llama):
    """The reward is read at each row's last real token, so the pad tokens added for reuse change nothing."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from stages.core.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_llama))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    rows = [tokenizer("a short answer")["input_ids"], tokenizer("a somewhat longer answer than the other one")["input_ids"]]

    def rewards(multiple):
        batch = tokenizer.pad({"input_ids": rows}, pad_to_multiple_of=multiple, return_tensors="pt")
        with torch.no_grad():
            return batch["input_ids"].shape[1], model(**batch).logits.squeeze(-1)

    (width, padded), (natural, plain) = rewards(32), rewards(None)
    assert width % 32 == 0 and width > natural
    torch.testing.assert_close(padded, plain)
