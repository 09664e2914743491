"""Feedback data through the stages (KTO on thumbs-labelled conversations, a reward model on ratings) and
files that cannot be read stopping a stage with one line before any weights load."""
import json
import random
from pathlib import Path

import pytest

from stages import kto, rm, sft
from synthetic import preference_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def manifest(out):
    return json.loads((Path(out) / "manifest.json").read_text())


def thumbs_rows(n, seed=0):
    """Conversations (ShareGPT-style keys in half of them) whose last assistant turn carries a kto_tag."""
    rows = []
    for i, r in enumerate(preference_rows(n, seed=seed)):
        for reply, tag in ((r["chosen"], True), (r["rejected"], False)):
            rows.append({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": r["prompt"]},
                                      {"role": "assistant", "content": reply}], "kto_tag": tag})
    return rows


def test_kto_stage_trains_on_conversations_with_a_thumbs_label(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "thumbs.jsonl", thumbs_rows(24))
    out = tmp_path / "kto"
    kto.main(["--config", str(ROOT / "recipes/tiny/kto.yaml"), "--model_name_or_path", str(tiny_llama),
              "--output_dir", str(out), "--datasets", data, "--eval_datasets", "[]", "--validation_fraction", "0.25",
              "--max_steps", "2"])
    m = manifest(out)
    src = m["data"]["sources"][0]
    assert m["stage"] == "kto" and m["data"]["task"] == "unpaired"
    assert src["format"] == "messages_label" and src["rows_read"] == 48 and src["rows_kept"] == 48
    assert m["data"]["train_size"] + m["data"]["eval_size"] == 48


def test_reward_model_trains_on_rated_conversations_with_the_gap_as_margin(tiny_llama, tmp_path):
    rng = random.Random(0)
    rows = []
    for r in preference_rows(24, seed=0):  # per prompt: a good reply rated 4-5, a bad one rated 1-2, and a tie
        good, bad = rng.choice((4, 5)), rng.choice((1, 2))
        for reply, rating in ((r["chosen"], good), (r["rejected"], bad), (r["rejected"] + "!", bad)):
            rows.append({"conversations": [{"from": "human", "value": r["prompt"]}, {"from": "gpt", "value": reply}],
                         "score": rating})
    data = write_jsonl(tmp_path / "rated.jsonl", rows)
    out = tmp_path / "rm"
    rm.main(["--config", str(ROOT / "recipes/tiny/rm.yaml"), "--model_name_or_path", str(tiny_llama),
             "--output_dir", str(out), "--datasets", data, "--eval_datasets", "[]", "--validation_fraction", "0.25",
             "--rating_scale", "1", "5", "--max_steps", "2"])
    m = manifest(out)
    src = m["data"]["sources"][0]
    assert src["format"] == "sharegpt_rating" and src["rows_read"] == 72
    assert src["rows_kept"] == 48 and src["dropped_by_reason"] == {}  # two pairs per prompt; the tie never pairs
    assert m["config"]["data"]["rating_scale"] == [1.0, 5.0]


@pytest.mark.parametrize("name,content,where", [
    ("train.jsonl", b'{"prompt": "q", "completion": "a"}\n{"prompt": "\xff"}\n', "line 2"),
    ("train.csv", b'prompt,completion\nq,a\n"q2,a2\n', "line 3"),
    ("train.csv", b"", "the file is empty"),
    ("train.parquet", b"", "the file is empty"),
    ("train.jsonl", b"\n\n", "the file is empty"),
])
def test_unreadable_data_stops_the_stage_with_one_line_before_weights_load(tiny_llama, tmp_path, monkeypatch, capsys,
                                                                           name, content, where):
    import transformers

    def no_weights(*a, **k):
        raise AssertionError("weights loaded before the data was read")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    (tmp_path / name).write_bytes(content)
    rc = sft.cli(["--config", str(ROOT / "recipes/tiny/sft.yaml"), "--model_name_or_path", str(tiny_llama),
                  "--output_dir", str(tmp_path / "out"), "--datasets", str(tmp_path / name), "--eval_datasets", "[]"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and err.startswith(f"error: {tmp_path / name}: {where}"), err
    assert not (tmp_path / "out" / "manifest.json").exists()
