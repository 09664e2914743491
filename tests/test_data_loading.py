"""Loading sources (stages/core/data.py): file types, mixtures, validation policy, dedupe, split."""
import json
import sys
import types

import datasets
import pytest

from stages.core.data import load_data
from stages.core.errors import ConfigError, DataError


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


def sft_rows(n, tag="q"):
    return [{"messages": [U(f"{tag}{i}"), A(f"a{i}")]} for i in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def contents(ds, col="messages"):
    return [r[col][0]["content"] for r in ds]


# ------------------------------------------------------------ file types


def test_jsonl_and_json_files(tmp_path):
    rows = sft_rows(5)
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "c.json").write_text("\n".join(json.dumps(r) for r in rows))  # JSON lines in a .json
    for path in (a, str(tmp_path / "b.json"), str(tmp_path / "c.json")):
        d = load_data([path], task="sft", validation_fraction=0)
        assert sorted(contents(d.train)) == [f"q{i}" for i in range(5)]
        assert d.train.column_names == ["messages"] and d.eval is None
        assert d.train[0]["messages"][1]["role"] == "assistant"


def test_csv_with_json_cells_and_bool_labels(tmp_path):
    p = tmp_path / "kto.csv"
    p.write_text('prompt,completion,label\nq1,a1,True\nq2,a2,False\n"[{""role"": ""user"", ""content"": ""q3""}]",a3,True\n')
    d = load_data([str(p)], task="unpaired", validation_fraction=0)
    got = sorted((r["prompt"][0]["content"], r["completion"][0]["content"], r["label"]) for r in d.train)
    assert got == [("q1", "a1", True), ("q2", "a2", False), ("q3", "a3", True)]


def test_parquet_file(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad", "margin": float(i)} for i in range(4)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    d = load_data([str(tmp_path / "p.parquet")], task="preference", validation_fraction=0)
    assert d.train.column_names == ["prompt", "chosen", "rejected", "margin"]
    assert sorted(d.train["margin"]) == [0.0, 1.0, 2.0, 3.0]
    assert d.report.sources[0].format == "preference"


def test_directory_of_files_reports_file_and_row(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", sft_rows(3))
    write_jsonl(tmp_path / "b.jsonl", sft_rows(1, "x") + [{"messages": [U("q"), A("")]}])
    (tmp_path / "notes.txt").write_text("ignored")
    with pytest.raises(DataError) as e:
        load_data([str(tmp_path)], task="sft")
    assert str(e.value).startswith(f"{tmp_path / 'b.jsonl'}: row 1: field 'messages[1].content': ")
    d = load_data([str(tmp_path)], task="sft", on_invalid="drop", validation_fraction=0)
    rep = d.report.sources[0]
    assert (rep.rows_read, rep.rows_kept, rep.dropped_by_reason) == (5, 4, {"empty_content": 1})
    assert len(rep.files) == 2


def test_save_to_disk_dataset_and_dict(tmp_path):
    datasets.Dataset.from_list(sft_rows(4)).save_to_disk(str(tmp_path / "ds"))
    assert len(load_data([str(tmp_path / "ds")], task="sft", validation_fraction=0).train) == 4
    datasets.DatasetDict({"train": datasets.Dataset.from_list(sft_rows(3)),
                          "test": datasets.Dataset.from_list(sft_rows(2, "t"))}).save_to_disk(str(tmp_path / "dd"))
    d = load_data([{"path": str(tmp_path / "dd"), "split": "test"}], task="sft", validation_fraction=0)
    assert sorted(contents(d.train)) == ["t0", "t1"]
    with pytest.raises(DataError, match="split 'dev' not found; splits: train, test"):
        load_data([{"path": str(tmp_path / "dd"), "split": "dev"}], task="sft")


def test_data_files_with_builder_name(tmp_path):
    write_jsonl(tmp_path / "tr.jsonl", sft_rows(3))
    d = load_data([{"path": "json", "data_files": {"train": "tr.jsonl"}, "data_dir": str(tmp_path)}],
                  task="sft", validation_fraction=0)
    assert len(d.train) == 3


def test_demo_scheme(monkeypatch):
    calls = []
    fake = types.ModuleType("stages.core.demo")
    fake.load = lambda name: calls.append(name) or [{"prompt": "2+3?", "completion": "5", "meta": {"answer": 5}}]
    monkeypatch.setitem(sys.modules, "stages.core.demo", fake)
    d = load_data(["demo:arith"], task="sft", validation_fraction=0)
    assert calls == ["arith"]
    assert d.train.to_list() == [{"messages": [U("2+3?"), A("5")], "meta": {"answer": 5}}]


def test_hub_name_calls_load_dataset(monkeypatch):
    seen = {}

    def fake_load_dataset(path, name=None, **kw):
        seen.update(path=path, name=name, **kw)
        return datasets.Dataset.from_list(sft_rows(2))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    d = load_data([{"path": "org/chat-data", "name": "en", "split": "train_sft"}], task="sft", validation_fraction=0)
    assert seen == {"path": "org/chat-data", "name": "en", "data_dir": None, "data_files": None, "split": "train_sft"}
    assert len(d.train) == 2 and d.report.sources[0].source == "org/chat-data [train_sft]"


def test_missing_file_and_malformed_json(tmp_path):
    with pytest.raises(DataError, match="file or directory not found: .*nope.jsonl"):
        load_data([str(tmp_path / "nope.jsonl")], task="sft")
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(sft_rows(1)[0]) + "\n\n{not json}\n")
    with pytest.raises(DataError, match=r"bad.jsonl: malformed JSON on line 3"):
        load_data([str(p)], task="sft")


def test_unknown_source_key_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"datasets\[0\]: unknown key 'wieght' \(did you mean 'weight'\?\)"):
        load_data([{"path": "x.jsonl", "wieght": 2}], task="sft")
    with pytest.raises(ConfigError, match="did you mean 'preference'"):
        load_data(["x.jsonl"], task="preferences")


def test_undetectable_format_and_mapping_hint(tmp_path):
    p = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"no known dataset format matches columns \['answer', 'question'\]"):
        load_data([p], task="sft")
    with pytest.raises(ConfigError, match=r"reversed\? did you mean \{'prompt': 'question'\}"):
        load_data([p], task="sft", column_mapping={"question": "prompt"})
    with pytest.raises(DataError, match=r"maps 'prompt' to column 'query', which is not in the data"):
        load_data([p], task="sft", column_mapping={"prompt": "query", "completion": "answer"})
    d = load_data([{"path": p, "column_mapping": {"prompt": "question", "completion": "answer"}}], task="sft",
                  validation_fraction=0)
    assert d.train.to_list() == [{"messages": [U("q"), A("a")]}]


def test_columns_and_max_rows(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [dict(r, meta=i) for i, r in enumerate(sft_rows(10))])
    d = load_data([{"path": p, "columns": ["messages"], "max_rows": 4}], task="sft", validation_fraction=0)
    assert d.train.column_names == ["messages"] and len(d.train) == 4
    assert d.report.sources[0].rows_read == 4
    assert len(load_data([p], task="sft", validation_fraction=0, max_rows=6).train) == 6


# ------------------------------------------------------------ validation policy, dedupe


def test_on_invalid_drop_counts_and_examples(tmp_path):
    rows = [{"prompt": "q1", "chosen": "g", "rejected": "g"},      # identical
            {"prompt": "q2", "chosen": "", "rejected": "b"},        # empty response
            {"prompt": "q3", "chosen": "g", "rejected": "b"},
            {"prompt": "q4", "chosen": "g2", "rejected": "b2"},
            {"prompt": "q5", "chosen": "g", "rejected": "g"}]       # identical
    p = write_jsonl(tmp_path / "pref.jsonl", rows)
    with pytest.raises(DataError, match=r"pref.jsonl: row 0: field 'rejected': chosen and rejected are identical"):
        load_data([p], task="preference")
    d = load_data([p], task="preference", on_invalid="drop", validation_fraction=0)
    rep = d.report.to_dict()
    assert rep["sources"][0]["dropped_by_reason"] == {"identical_pair": 2, "empty_response": 1}
    assert rep["totals"] == {"rows_read": 5, "rows_kept": 2, "dropped": 3, "duplicates_removed": 0}
    assert [(e["row"], e["field"], e["reason"]) for e in rep["dropped_examples"]] == [
        (0, "rejected", "identical_pair"), (1, "chosen", "empty_response"), (4, "rejected", "identical_pair")]
    assert "pref.jsonl" in rep["dropped_examples"][0]["source"]
    assert "identical_pair=2" in d.report.summary()


def test_non_boolean_label_error_names_row(tmp_path):
    p = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "q", "completion": "a", "label": True},
                                             {"prompt": "q", "completion": "b", "label": 1}])
    with pytest.raises(DataError, match=r"kto.jsonl: row 1: field 'label': label must be a boolean"):
        load_data([p], task="unpaired")


def test_duplicates_removed_within_and_across_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", sft_rows(5) + sft_rows(2))
    b = write_jsonl(tmp_path / "b.jsonl", sft_rows(3) + sft_rows(4, "z"))
    d = load_data([a, b], task="sft", validation_fraction=0)
    assert [s.duplicates_removed for s in d.report.sources] == [2, 3]
    assert [s.rows_kept for s in d.report.sources] == [5, 4]
    assert len(d.train) == 9 and d.report.totals()["duplicates_removed"] == 5


# ------------------------------------------------------------ split, mixtures, fingerprints


def test_split_is_deterministic_seeded_and_order_independent(tmp_path):
    rows = sft_rows(50)
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    b = write_jsonl(tmp_path / "b.jsonl", rows[::-1])
    d1, d2 = load_data([a], task="sft", seed=1), load_data([a], task="sft", seed=1)
    assert (len(d1.train), len(d1.eval)) == (45, 5)
    assert d1.train.to_list() == d2.train.to_list() and d1.eval.to_list() == d2.eval.to_list()
    assert d1.report.train_fingerprint == d2.report.train_fingerprint
    assert sorted(contents(load_data([b], task="sft", seed=1).eval)) == sorted(contents(d1.eval))
    d3 = load_data([a], task="sft", seed=2)
    assert sorted(contents(d3.eval)) != sorted(contents(d1.eval))
    assert not set(contents(d1.eval)) & set(contents(d1.train))
    assert len(load_data([a], task="sft", validation_size=7).eval) == 7
    assert d1.report.split["rule"] == "hash(seed=1): 5 of 50 unique rows held out"


def test_eval_sources_remove_overlap(tmp_path):
    tr = write_jsonl(tmp_path / "tr.jsonl", sft_rows(10))
    ev = write_jsonl(tmp_path / "ev.jsonl", sft_rows(2) + sft_rows(1, "e"))
    d = load_data([tr], task="sft", eval_sources=[ev])
    assert (len(d.train), len(d.eval), d.report.eval_overlap_removed) == (8, 3, 2)
    assert d.report.eval_sources[0].rows_eval == 3 and d.report.eval_fingerprint


def _prompts(ds):
    return {r["prompt"][0]["content"] for r in ds}


def test_kto_from_pairs_splits_by_prompt(tmp_path):
    """Pairs unpaired into chosen/rejected rows: both rows of a prompt land on the same side."""
    pairs = [{"prompt": [U(f"q{i}")], "chosen": [A(f"good{i}")], "rejected": [A(f"bad{i}")]} for i in range(40)]
    pairs += [{"prompt": [U(f"q{i}")], "chosen": [A(f"fine{i}")], "rejected": [A(f"poor{i}")]} for i in range(10)]
    src = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    for seed in range(5):
        d = load_data([src], task="unpaired", validation_fraction=0.2, seed=seed)
        assert d.eval is not None and len(d.eval) >= 20  # 20 of 100 rows, whole prompts
        assert not _prompts(d.train) & _prompts(d.eval), seed
        assert _prompts(d.train) | _prompts(d.eval) == {f"q{i}" for i in range(40)}
        assert len(d.train) + len(d.eval) == 100
        for ds in (d.train, d.eval):  # every prompt keeps its chosen and rejected rows together
            labels = {}
            for r in ds:
                labels.setdefault(r["prompt"][0]["content"], set()).add(r["label"])
            assert all(v == {True, False} for v in labels.values())
        assert "whole prompts" in d.report.split["rule"]


def test_kto_eval_sources_remove_training_rows_with_an_eval_prompt(tmp_path):
    pairs = [{"prompt": [U(f"q{i}")], "chosen": [A(f"good{i}")], "rejected": [A(f"bad{i}")]} for i in range(6)]
    tr = write_jsonl(tmp_path / "tr.jsonl", pairs)
    ev = write_jsonl(tmp_path / "ev.jsonl", [{"prompt": [U("q0")], "completion": [A("other")], "label": True}])
    d = load_data([tr], task="unpaired", eval_sources=[ev])
    assert "q0" not in _prompts(d.train) and len(d.train) == 10 and d.report.eval_overlap_removed == 2


def test_weights_repeat_and_subsample(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", sft_rows(10, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", sft_rows(10, "b"))
    d = load_data([{"path": a, "weight": 2.0}, {"path": b, "weight": 0.5}], task="sft", validation_fraction=0)
    names = contents(d.train)
    assert sum(n.startswith("a") for n in names) == 20 and sum(n.startswith("b") for n in names) == 5
    assert all(names.count(f"a{i}") == 2 for i in range(10))
    again = load_data([{"path": a, "weight": 2.0}, {"path": b, "weight": 0.5}], task="sft", validation_fraction=0)
    assert contents(again.train) == names
    assert [s.rows_train for s in d.report.sources] == [20, 5]
    with pytest.raises(ConfigError, match="weight must be a number > 0"):
        load_data([{"path": a, "weight": 0}], task="sft")


def test_fractions_follow_trl(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", sft_rows(10, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", sft_rows(30, "b"))
    d = load_data([{"path": a, "fraction": 0.25}, {"path": b, "fraction": 0.75}], task="sft", validation_fraction=0)
    assert [s.rows_kept for s in d.report.sources] == [10, 30]
    d = load_data([{"path": a, "fraction": 1}, {"path": b, "fraction": 1}], task="sft", validation_fraction=0)
    assert [s.rows_kept for s in d.report.sources] == [10, 10]
    assert sorted(n for n in contents(d.train) if n.startswith("b")) == sorted(f"b{i}" for i in range(10))
    with pytest.raises(ConfigError, match="either all datasets in the mixture or none"):
        load_data([{"path": a, "fraction": 0.5}, b], task="sft")


def test_fingerprints_and_report_shape(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", sft_rows(10))
    b = write_jsonl(tmp_path / "b.jsonl", sft_rows(10, "x"))
    r1 = load_data([a], task="sft").report.to_dict()
    r2 = load_data([a], task="sft").report.to_dict()
    r3 = load_data([b], task="sft").report.to_dict()
    assert r1["fingerprints"] == r2["fingerprints"] and r1["fingerprints"]["train"] != r3["fingerprints"]["train"]
    assert len(r1["fingerprints"]["train"]) == 64 and r1["fingerprints"]["sources"] == [r1["sources"][0]["fingerprint"]]
    assert {"task", "on_invalid", "sources", "eval_sources", "split", "train_size", "eval_size", "totals",
            "fingerprints", "dropped_examples", "eval_overlap_removed"} <= set(r1)
    assert set(r1["sources"][0]) >= {"source", "format", "rows_read", "rows_kept", "dropped_by_reason",
                                     "duplicates_removed", "fingerprint", "weight"}
    json.dumps(r1)


def test_optional_columns_filled_and_mixed_meta(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "q1", "chosen": "g", "rejected": "b", "margin": 1.5,
                                             "meta": {"k": 1}},
                                            {"prompt": "q2", "chosen": "g", "rejected": "b"}])
    d = load_data([a], task="preference", validation_fraction=0)
    by_prompt = {r["prompt"][0]["content"]: r for r in d.train}
    assert (by_prompt["q1"]["margin"], by_prompt["q1"]["meta"]) == (1.5, {"k": 1})
    assert (by_prompt["q2"]["margin"], by_prompt["q2"]["meta"]) == (None, None)
    assert d.report.meta_encoding == "native"
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q1", "meta": {"k": 1}}, {"prompt": "q2", "meta": "text"}])
    d = load_data([b], task="prompt", validation_fraction=0)
    assert d.report.meta_encoding == "json"
    assert sorted(d.train["meta"]) == ['"text"', '{"k": 1}']


def test_no_training_rows_left_explains_why(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", sft_rows(3))
    with pytest.raises(DataError, match="no training rows left: 3 read, 0 invalid, 0 duplicates, 3 identical to eval"):
        load_data([a], task="sft", eval_sources=[a])
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": [U("q")]}])
    with pytest.raises(DataError, match="1 invalid.*e.g. .*b.jsonl: row 0: field 'messages'"):
        load_data([b], task="sft", on_invalid="drop")


# ------------------------------------------------------------ feedback data: labels and ratings


def rated_rows():
    """Two prompts rated 1-5 (three answers each, one tie), one prompt with a single rating."""
    rows = []
    for q, ratings in (("q1", (5, 2, 2)), ("q2", (1, 4, 3)), ("q3", (4,))):
        rows += [{"messages": [U(q), A(f"{q}-a{i}")], "rating": r} for i, r in enumerate(ratings)]
    return rows


def pair_set(ds):
    return sorted((r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"], r["margin"])
                  for r in ds)


def test_ratings_become_preference_pairs_per_prompt(tmp_path):
    p = write_jsonl(tmp_path / "rated.jsonl", rated_rows())
    d = load_data([p], task="preference", validation_fraction=0, rating_scale=[1, 5])
    assert pair_set(d.train) == [("q1", "q1-a0", "q1-a1", 3.0), ("q1", "q1-a0", "q1-a2", 3.0),
                                 ("q2", "q2-a1", "q2-a0", 3.0), ("q2", "q2-a1", "q2-a2", 1.0),
                                 ("q2", "q2-a2", "q2-a0", 2.0)]
    rep = d.report.sources[0]
    assert rep.format == "messages_rating" and rep.rows_read == 7 and rep.rows_kept == 5
    assert rep.dropped_by_reason == {"no_rating_partner": 1}  # q3's single rating
    d = load_data([{"path": p, "pairs": "extremes"}], task="preference", validation_fraction=0)
    assert pair_set(d.train) == [("q1", "q1-a0", "q1-a1", 3.0), ("q2", "q2-a1", "q2-a0", 3.0)]
    assert d.report.sources[0].dropped_by_reason == {"no_rating_partner": 3}


def test_ratings_become_kto_labels_by_threshold(tmp_path):
    p = write_jsonl(tmp_path / "rated.jsonl", rated_rows())
    d = load_data([p], task="unpaired", validation_fraction=0, rating_scale=[1, 5])
    got = sorted((r["completion"][0]["content"], r["label"]) for r in d.train)
    assert got == [("q1-a0", True), ("q1-a1", False), ("q1-a2", False), ("q2-a0", False), ("q2-a1", True),
                   ("q2-a2", True), ("q3-a0", True)]
    d = load_data([{"path": p, "rating_threshold": 4.5}], task="unpaired", validation_fraction=0, rating_scale=[1, 5])
    assert sorted(r["completion"][0]["content"] for r in d.train if r["label"]) == ["q1-a0"]
    with pytest.raises(DataError, match=r"rated.jsonl: row 0: field 'rating': rating 5 is outside the default scale"):
        load_data([p], task="unpaired", validation_fraction=0)


def test_conversation_labels_load_for_kto_and_pair_for_dpo(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": a}], "kto_tag": lab}
            for a, lab in (("good", True), ("bad", False))]
    p = write_jsonl(tmp_path / "thumbs.jsonl", rows)
    d = load_data([p], task="unpaired", validation_fraction=0)
    assert sorted((r["completion"][0]["content"], r["label"]) for r in d.train) == [("bad", False), ("good", True)]
    assert d.report.sources[0].format == "sharegpt_label"
    d = load_data([p], task="preference", validation_fraction=0)
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in d.train] == [("good", "bad")]
    assert "margin" not in d.train.column_names


def test_pairs_from_ratings_keep_each_prompt_on_one_side_of_the_split(tmp_path):
    rows = [{"messages": [U(f"q{i}"), A(f"a{i}-{j}")], "rating": j} for i in range(12) for j in range(3)]
    d = load_data([write_jsonl(tmp_path / "r.jsonl", rows)], task="preference", validation_fraction=0.25,
                  rating_scale=[0, 2])
    train = {r["prompt"][0]["content"] for r in d.train}
    held = {r["prompt"][0]["content"] for r in d.eval}
    assert held and train and not train & held
    assert len(d.train) + len(d.eval) == 36  # 3 pairs per prompt


def test_bad_feedback_rows_dropped_and_counted_by_reason(tmp_path):
    rows = rated_rows() + [{"messages": [U("q4"), A("x")], "rating": "five"},
                           {"messages": [U("q4"), A("y")], "rating": 9},
                           {"messages": [U("q4"), U("z")], "rating": 1}]
    p = write_jsonl(tmp_path / "rated.jsonl", rows)
    with pytest.raises(DataError, match=r"rated.jsonl: row 7: field 'rating': rating must be a finite number"):
        load_data([p], task="preference", rating_scale=[1, 5])
    d = load_data([p], task="preference", validation_fraction=0, on_invalid="drop", rating_scale=[1, 5])
    assert d.report.sources[0].dropped_by_reason == {"invalid_rating": 1, "rating_out_of_scale": 1,
                                                     "no_assistant_turn": 1, "no_rating_partner": 1}
    assert [(e["row"], e["field"]) for e in d.report.dropped_examples] == [(7, "rating"), (8, "rating"),
                                                                         (9, "messages[1].role")]


# ------------------------------------------------------------ files that cannot be read: one line naming the file


@pytest.mark.parametrize("name,content,message", [
    ("latin1.jsonl", b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', r"latin1.jsonl: line 2: byte 0xe9 \(column 16\) is not UTF-8"),
    ("latin1.csv", b"prompt\nok\ncaf\xe9\n", r"latin1.csv: line 3: byte 0xe9 .* is not UTF-8"),
    ("quote.csv", b'prompt,completion\nq1,a1\n"q2,a2\nq3,a3\n', r"quote.csv: line 3: a quoted field .* never closed"),
    ("empty.csv", b"", r"empty.csv: the file is empty"),
    ("header.csv", b"prompt,completion\n", r"header.csv: the file holds no rows \(only a header\)"),
    ("empty.parquet", b"", r"empty.parquet: the file is empty \(0 bytes\)"),
    ("junk.parquet", b"not parquet at all", r"junk.parquet: not a readable Parquet file"),
    ("empty.jsonl", b"", r"empty.jsonl: the file is empty"),
    ("blank.jsonl", b"\n  \n\n", r"blank.jsonl: the file is empty"),
    ("blank.json", b"  \n", r"blank.json: the file is empty"),
    ("array.json", b"[]", r"array.json: the file holds no rows"),
])
def test_unreadable_files_are_one_error_naming_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message) as e:
        load_data([str(tmp_path / name)], task="prompt", validation_fraction=0)
    assert "\n" not in str(e.value) and str(tmp_path / name) in str(e.value)


def test_empty_parquet_table_names_the_file(tmp_path):
    datasets.Dataset.from_dict({"prompt": []}).to_parquet(str(tmp_path / "none.parquet"))
    with pytest.raises(DataError, match=r"none.parquet: the file holds no rows"):
        load_data([str(tmp_path / "none.parquet")], task="prompt", validation_fraction=0)


def test_jsonl_string_holding_a_line_separator_is_one_row(tmp_path):
    p = tmp_path / "u2028.jsonl"
    rows = [{"prompt": "first\u2028still first"}, {"prompt": "para\u2029graph"}, {"prompt": "third"}]
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    assert "\u2028" in p.read_text(encoding="utf-8")  # written raw, not escaped
    d = load_data([str(p)], task="prompt", validation_fraction=0)
    assert sorted(r["prompt"][0]["content"] for r in d.train) == ["first\u2028still first", "para\u2029graph", "third"]


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes("\ufeffprompt\nq\n".encode("utf-8"))
    d = load_data([str(p)], task="prompt", validation_fraction=0)
    assert [r["prompt"][0]["content"] for r in d.train] == ["q"]


def test_ratings_that_never_pair_are_explained_when_nothing_is_left(tmp_path):
    p = write_jsonl(tmp_path / "single.jsonl", [{"messages": [U(f"q{i}"), A("a")], "rating": 1} for i in range(3)])
    with pytest.raises(DataError, match="3 read, 0 invalid.*3 ratings with no other rating of their prompt"):
        load_data([p], task="preference", validation_fraction=0)
