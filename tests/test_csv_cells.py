"""A CSV cell is text, as written: an answer "4" or "None" is an answer, not a number or a missing value. The fields
that are not text read their own type from the cell's text: a KTO/feedback `label` ("true"/"false"), a `rating` and a
`margin` (numbers), a classification label id. A margin or rating that is not a finite number is a bad row."""
import pytest

from stages.core.classify_data import load_classification, read_taxonomy
from stages.core.data import load_data
from stages.core.errors import DataError


def write(path, text: str):
    path.write_text(text)
    return str(path)


def test_numbers_and_na_words_in_text_cells_stay_text(tmp_path):
    f = write(tmp_path / "arith.csv", "prompt,completion\nWhat is 2 plus 2?,4\nHalf of 3?,1.50\n"
                                      "Which Python value means nothing?,None\nMissing in pandas?,NA\nNot a number?,nan\n")
    d = load_data([f], task="sft", validation_fraction=0)
    answers = sorted(r["messages"][1]["content"] for r in d.train)
    assert answers == ["1.50", "4", "NA", "None", "nan"]  # "1.50" kept as written, not the float 1.5


def test_an_empty_cell_is_a_missing_field_naming_file_row_and_field(tmp_path):
    f = write(tmp_path / "gap.csv", "prompt,completion\nq1,a1\nq2,\n")
    with pytest.raises(DataError, match=r"gap.csv: row 1: field 'completion': .*missing"):
        load_data([f], task="sft", validation_fraction=0)


def test_label_rating_and_margin_cells_read_their_own_types(tmp_path):
    kto = write(tmp_path / "kto.csv", "prompt,completion,label\nq1,4,TRUE\nq2,5,false\n")
    got = sorted((r["completion"][0]["content"], r["label"]) for r in load_data([kto], task="unpaired",
                                                                                 validation_fraction=0).train)
    assert got == [("4", True), ("5", False)]
    rated = write(tmp_path / "rated.csv", "prompt,completion,rating\nq,good,4.5\nq,bad,2\n")
    (pair,) = load_data([rated], task="preference", validation_fraction=0).train
    assert pair["chosen"][0]["content"] == "good" and pair["margin"] == pytest.approx(2.5)
    margins = write(tmp_path / "pairs.csv", "prompt,chosen,rejected,margin\nq1,a,b,1.5\nq2,c,d,\n")
    got = {r["prompt"][0]["content"]: r.get("margin") for r in load_data([margins], task="preference",
                                                                          validation_fraction=0).train}
    assert got == {"q1": 1.5, "q2": None}  # an empty margin cell: no margin


@pytest.mark.parametrize("margin", ['"inf"', "Infinity", "-Infinity", '"1e999"', '"many"'])
def test_a_margin_that_is_not_a_finite_number_is_a_bad_row(tmp_path, margin):
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"prompt": "q0", "chosen": "a", "rejected": "b", "margin": 1}\n'
                 f'{{"prompt": "q1", "chosen": "a", "rejected": "b", "margin": {margin}}}\n')
    with pytest.raises(DataError, match=r"pairs.jsonl: row 1: field 'margin': margin must be a finite number"):
        load_data([str(f)], task="preference", validation_fraction=0)


def test_classification_ids_written_as_text_are_ids(tmp_path):
    f = write(tmp_path / "sentiment.csv", "text,label\ngreat film,1\nawful film,0\nfine film,1\nbad film,0\n")
    inferred = load_classification([f], validation_fraction=0)
    assert inferred.report.labels == ["0", "1"]
    assert {r["text"]: r["labels"] for r in inferred.train}["great film"] == [1]
    named = load_classification([f], taxonomy=read_taxonomy(["negative", "positive"]), validation_fraction=0)
    assert {r["text"]: r["labels"] for r in named.train}["great film"] == [1]  # id 1 = "positive"


def test_missing_value_words_in_a_csv_margin_or_label_cell_are_missing(tmp_path):
    pairs = write(tmp_path / "pairs.csv", "prompt,chosen,rejected,margin\nq1,a,b,1.5\nq2,c,d,NA\nq3,e,f,NaN\n")
    got = {r["prompt"][0]["content"]: r.get("margin") for r in load_data([pairs], task="preference",
                                                                          validation_fraction=0).train}
    assert got == {"q1": 1.5, "q2": None, "q3": None}
    labels = write(tmp_path / "labels.csv", "text,label\ngreat film,pos\nawful film,NA\n")
    with pytest.raises(DataError, match=r"labels.csv: row 1: field 'label': label missing"):
        load_classification([labels], validation_fraction=0)


def test_text_labels_of_json_rows_stay_names_even_when_they_are_digits(tmp_path):
    f = write(tmp_path / "stars.jsonl", '{"text": "meh", "label": "2"}\n{"text": "wow", "label": "5"}\n'
                                        '{"text": "ok", "label": "3"}\n')
    assert load_classification([f], validation_fraction=0).report.labels == ["2", "3", "5"]
