"""Classification data: taxonomy, label resolution, and every bad-input case named by file, row and field."""
import json

import pytest

from stages.core.classify_data import class_weights, load_classification, read_taxonomy
from stages.core.errors import ConfigError, DataError


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rows(*pairs):
    return [{"text": f"text number {i}", "label": lab} for i, lab in enumerate(pairs)]


def test_inferred_taxonomy_is_sorted_and_ids_follow_it(tmp_path):
    f = write(tmp_path / "t.jsonl", rows("zeta", "alpha", "mid", "alpha", "zeta", "mid"))
    data = load_classification([f], validation_fraction=0)
    assert data.report.labels == ["alpha", "mid", "zeta"]
    by_text = {r["text"]: r["labels"] for r in data.train}
    assert by_text["text number 0"] == [2] and by_text["text number 1"] == [0]


def test_recipe_taxonomy_keeps_its_order_and_accepts_integer_ids(tmp_path):
    f = write(tmp_path / "t.jsonl", [{"text": "a b", "label": 1}, {"text": "c d", "label": "no"}])
    data = load_classification([f], taxonomy=read_taxonomy(["no", "yes"]), validation_fraction=0)
    assert {r["text"]: r["labels"] for r in data.train} == {"a b": [1], "c d": [0]}


def test_taxonomy_from_a_file(tmp_path):
    (tmp_path / "labels.txt").write_text("spam\nham\n")
    assert read_taxonomy(str(tmp_path / "labels.txt")).labels == ["spam", "ham"]


def test_unknown_label_names_file_row_field_and_the_closest_label(tmp_path):
    f = write(tmp_path / "t.jsonl", rows("billing", "shipping", "biling"))
    with pytest.raises(DataError) as e:
        load_classification([f], taxonomy=read_taxonomy(["billing", "shipping"]), validation_fraction=0)
    msg = str(e.value)
    assert "t.jsonl" in msg and "row 2" in msg and "field 'label'" in msg and "closest valid label: 'billing'" in msg


def test_empty_text_is_refused_with_its_position(tmp_path):
    f = write(tmp_path / "t.jsonl", rows("a", "b") + [{"text": "  ", "label": "a"}])
    with pytest.raises(DataError, match=r"row 2: field 'text': text is empty"):
        load_classification([f], validation_fraction=0)


def test_missing_label_is_refused_with_its_position(tmp_path):
    f = write(tmp_path / "t.jsonl", rows("a", "b") + [{"text": "no label here"}])
    with pytest.raises(DataError, match=r"row 2: field 'label': label missing"):
        load_classification([f], validation_fraction=0)


def test_label_id_out_of_range_is_refused(tmp_path):
    f = write(tmp_path / "t.jsonl", [{"text": "x y", "label": 5}])
    with pytest.raises(DataError, match="label id 5 is out of range"):
        load_classification([f], taxonomy=read_taxonomy(["a", "b"]), validation_fraction=0)


def test_several_labels_in_a_single_label_task_point_to_multi_label(tmp_path):
    f = write(tmp_path / "t.jsonl", [{"text": "x", "labels": ["a", "b"]}, {"text": "y", "labels": ["b"]}])
    with pytest.raises(DataError, match="multi_label: true"):
        load_classification([f], validation_fraction=0)
    data = load_classification([f], multi_label=True, validation_fraction=0)
    assert sorted(map(tuple, data.train["labels"])) == [(0, 1), (1,)]


def test_validation_label_absent_from_training_is_a_warning_with_counts(tmp_path):
    train = write(tmp_path / "train.jsonl", rows("a", "b", "a", "b"))
    held = write(tmp_path / "held.jsonl", [{"text": "held 1", "label": "c"}, {"text": "held 2", "label": "c"},
                                           {"text": "held 3", "label": "a"}])
    data = load_classification([train], eval_sources=[held])
    assert data.report.labels == ["a", "b", "c"]
    warning = " ".join(data.report.warnings)
    assert "c (2 validation rows, 0 training rows)" in warning


def test_class_imbalance_is_reported_and_balanced_weights_follow_counts(tmp_path):
    f = write(tmp_path / "t.jsonl", rows(*(["a"] * 12 + ["b"] * 2)))
    data = load_classification([f], validation_fraction=0)
    assert data.report.class_counts["train"] == {"a": 12, "b": 2}
    assert data.report.imbalance_ratio == 6.0 and "imbalanced" in " ".join(data.report.warnings)
    assert class_weights(data.report, False, 14) == pytest.approx([14 / 24, 14 / 4])


def test_column_mapping_and_messages_input(tmp_path):
    f = write(tmp_path / "t.jsonl", [{"review": "good stuff", "stars": "pos"}, {"review": "bad stuff", "stars": "neg"}])
    data = load_classification([f], column_mapping={"text": "review", "label": "stars"}, validation_fraction=0)
    assert sorted(data.train["text"]) == ["bad stuff", "good stuff"]
    m = write(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"}], "label": "x"},
                                     {"messages": [{"role": "user", "content": "yo"}], "label": "y"}])
    assert len(load_classification([m], validation_fraction=0).train) == 2
    with pytest.raises(ConfigError, match="did you mean 'text'"):
        load_classification([f], column_mapping={"txt": "review"})


def test_split_is_deterministic_and_content_based(tmp_path):
    f = write(tmp_path / "t.jsonl", rows(*(["a", "b"] * 20)))
    one = load_classification([f], validation_fraction=0.25, seed=3)
    two = load_classification([f], validation_fraction=0.25, seed=3)
    assert list(one.eval["text"]) == list(two.eval["text"]) and len(one.eval) == 10
    assert not set(one.eval["text"]) & set(one.train["text"])


def test_demo_sets_are_deterministic_decidable_and_never_name_their_label():
    from stages.core import demo, demo_classify

    for name in demo.CLASSIFY_NAMES:
        rows = demo.load(name)
        assert rows == demo.load(name)
        for r in rows:
            truth = r["labels"] if "labels" in r else [r["label"]]
            assert demo_classify.verify_label(r["text"]) == truth
            assert not any(label in r["text"].lower() for label in demo_classify.LABELS)
    single = demo.load("classify")
    assert {r["label"] for r in single} == set(demo_classify.LABELS) and len(demo_classify.LABELS) == 6
    assert not {r["text"] for r in single} & {r["text"] for r in demo.load("classify_eval")}
    assert max(len(r["labels"]) for r in demo.load("classify_multi")) == 3
