"""Format detection and row conversion (stages/core/formats.py): pure functions, no files."""
import pytest

from stages.core.errors import ConfigError, DataError
from stages.core.formats import RowError, check_task, convert_row, detect_format


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


def S(c):
    return {"role": "system", "content": c}


def conv(row, task, **kw):
    fmt = kw.pop("fmt", None) or detect_format(row.keys(), row, column_mapping=kw.get("column_mapping"))
    return convert_row(row, task=task, fmt=fmt, source="f.jsonl", index=3, **kw)


# ------------------------------------------------------------ detection + exact conversion

CASES = [
    ("messages", {"messages": [S("be nice"), U("hi"), A("hello")], "id": 7},
     "sft", [{"messages": [S("be nice"), U("hi"), A("hello")]}]),
    ("sharegpt", {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                                    {"from": "gpt", "value": "a"}, {"from": "user", "value": "q2"},
                                    {"from": "bot", "value": "a2"}]},
     "sft", [{"messages": [S("s"), U("q"), A("a"), U("q2"), A("a2")]}]),
    ("alpaca", {"instruction": "Add", "input": "2+2", "output": "4"},
     "sft", [{"messages": [U("Add\n\n2+2"), A("4")]}]),
    ("alpaca", {"instruction": "Say hi", "input": "", "output": "hi", "system": "short"},
     "sft", [{"messages": [S("short"), U("Say hi"), A("hi")]}]),
    ("prompt_completion", {"prompt": "2+2?", "completion": "4"}, "sft", [{"messages": [U("2+2?"), A("4")]}]),
    ("prompt_completion", {"prompt": [U("2+2?")], "completion": [A("4")]}, "sft", [{"messages": [U("2+2?"), A("4")]}]),
    ("preference", {"prompt": "q", "chosen": "good", "rejected": "bad"},
     "preference", [{"prompt": [U("q")], "chosen": [A("good")], "rejected": [A("bad")]}]),
    ("preference", {"prompt": [S("s"), U("q")], "chosen": [A("good")], "rejected": [A("bad")], "margin": 2},
     "preference", [{"prompt": [S("s"), U("q")], "chosen": [A("good")], "rejected": [A("bad")], "margin": 2.0}]),
    # ultrafeedback style: string prompt, chosen/rejected repeat it as a user turn
    ("preference", {"prompt": "q", "chosen": [U("q"), A("good")], "rejected": [U("q"), A("bad")]},
     "preference", [{"prompt": [U("q")], "chosen": [A("good")], "rejected": [A("bad")]}]),
    ("implicit_preference", {"chosen": [U("q"), A("x"), U("q2"), A("good")],
                             "rejected": [U("q"), A("x"), U("q2"), A("bad")]},
     "preference", [{"prompt": [U("q"), A("x"), U("q2")], "chosen": [A("good")], "rejected": [A("bad")]}]),
    ("hh", {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 4",
            "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 5"},
     "preference", [{"prompt": [U("hi"), A("hello"), U("2+2?")], "chosen": [A("4")], "rejected": [A("5")]}]),
    ("sharegpt_preference", {"conversations": [{"from": "human", "value": "q"}],
                             "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}},
     "preference", [{"prompt": [U("q")], "chosen": [A("good")], "rejected": [A("bad")]}]),
    ("unpaired", {"prompt": "q", "completion": "a", "label": False},
     "unpaired", [{"prompt": [U("q")], "completion": [A("a")], "label": False}]),
    ("prompt_only", {"prompt": "q"}, "prompt", [{"prompt": [U("q")]}]),
]


@pytest.mark.parametrize("fmt,row,task,expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_detect_and_convert(fmt, row, task, expected):
    assert detect_format(row.keys(), row) == fmt
    assert conv(row, task) == expected


def test_meta_passes_through_and_unknown_columns_are_ignored():
    row = {"prompt": "q", "completion": "a", "meta": {"answer": [1, 2]}, "junk": 5}
    assert conv(row, "sft") == [{"messages": [U("q"), A("a")], "meta": {"answer": [1, 2]}}]


@pytest.mark.parametrize("row,expected", [
    ({"messages": [U("q1"), A("a1"), U("q2"), A("a2")]}, [U("q1"), A("a1"), U("q2")]),
    ({"messages": [U("q1")]}, [U("q1")]),
    ({"prompt": "q", "chosen": "g", "rejected": "b"}, [U("q")]),
    ({"prompt": "q", "completion": "c", "label": True}, [U("q")]),
    ({"instruction": "i", "output": "o"}, [U("i")]),
])
def test_prompt_task_from_any_format(row, expected):
    assert conv(row, "prompt") == [{"prompt": expected}]


def test_preference_feeds_sft_and_unpaired():
    row = {"prompt": "q", "chosen": "g", "rejected": "b", "meta": 1}
    assert conv(row, "sft") == [{"messages": [U("q"), A("g")], "meta": 1}]
    assert conv(row, "unpaired") == [{"prompt": [U("q")], "completion": [A("g")], "label": True, "meta": 1},
                                     {"prompt": [U("q")], "completion": [A("b")], "label": False, "meta": 1}]


def test_incompatible_format_for_task():
    with pytest.raises(DataError, match="cannot be used for task 'preference'.*preference"):
        check_task("messages", "preference", source="f.jsonl")
    with pytest.raises(ConfigError, match="did you mean 'preference'"):
        check_task("preferense", "sft")


def test_forced_format_overrides_detection():
    # a row that auto-detects as preference, forced to read only prompt/completion-free prompt_only
    row = {"prompt": "q", "chosen": "g", "rejected": "b"}
    assert conv(row, "prompt", fmt="prompt_only") == [{"prompt": [U("q")]}]
    # HH transcripts forced on list data report the field
    with pytest.raises(RowError, match="field 'chosen'"):
        conv({"chosen": [U("q"), A("g")], "rejected": [U("q"), A("b")]}, "preference", fmt="hh")


def test_column_and_role_mapping():
    row = {"question": "q", "good": "g", "bad": "b"}
    cm = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    assert detect_format(row.keys(), row, column_mapping=cm) == "preference"
    assert conv(row, "preference", column_mapping=cm) == [{"prompt": [U("q")], "chosen": [A("g")], "rejected": [A("b")]}]
    row = {"dialog": [{"speaker": "Kunde", "text": "hallo"}, {"speaker": "Agent", "text": "hi"}]}
    cm = {"messages": "dialog", "role": "speaker", "content": "text"}
    rm = {"Kunde": "user", "Agent": "assistant"}
    assert conv(row, "sft", column_mapping=cm, role_mapping=rm) == [{"messages": [U("hallo"), A("hi")]}]


def test_no_format_matches_lists_columns_and_suggests_mapping():
    with pytest.raises(DataError) as e:
        detect_format(["question", "answer"], source="f.csv")
    msg = str(e.value)
    assert msg.startswith("f.csv:") and "['answer', 'question']" in msg
    assert "column_mapping" in msg and "alpaca: instruction+output" in msg


# ------------------------------------------------------------ validation errors: file, row, field, reason

BAD = [
    ({"messages": [U(""), A("a")]}, "sft", "empty_content", "messages[0].content"),
    ({"messages": [U("q"), A(5)]}, "sft", "non_string_content", "messages[1].content"),
    ({"messages": [U("q"), U("q2"), A("a")]}, "sft", "role_order", "messages[1].role"),
    ({"messages": [A("a"), U("q")]}, "sft", "role_order", "messages[0].role"),
    ({"messages": [U("q"), S("s"), A("a")]}, "sft", "role_order", "messages[1].role"),
    ({"messages": [U("q")]}, "sft", "no_assistant_turn", "messages"),
    ({"messages": [U("q"), A("a"), U("more")]}, "sft", "role_order", "messages[2].role"),
    ({"messages": [{"role": "narrator", "content": "x"}]}, "sft", "invalid_role", "messages[0].role"),
    ({"messages": [{"content": "x"}]}, "sft", "missing_field", "messages[0].role"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "preference", "identical_pair", "rejected"),
    ({"prompt": "q", "chosen": " ", "rejected": "b"}, "preference", "empty_response", "chosen"),
    ({"prompt": "q", "chosen": "g", "rejected": None}, "preference", "missing_field", "rejected"),
    ({"prompt": [A("x")], "chosen": "g", "rejected": "b"}, "preference", "role_order", "prompt[0].role"),
    ({"prompt": "q", "chosen": "g", "rejected": "b", "margin": "big"}, "preference", "invalid_value", "margin"),
    ({"prompt": "q", "completion": "a", "label": "yes"}, "unpaired", "invalid_label", "label"),
    ({"prompt": "q", "completion": "", "label": True}, "unpaired", "empty_response", "completion"),
    ({"instruction": "i", "output": ""}, "sft", "empty_response", "output"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: a"},
     "preference", "identical_pair", "rejected"),
    ({"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": "\n\nHuman: q\n\nAssistant: b"},
     "preference", "empty_response", "chosen"),
    ({"chosen": "no transcript here", "rejected": "nor here"}, "preference", "invalid_transcript", "chosen"),
]


@pytest.mark.parametrize("row,task,reason,field", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_validation_errors_name_file_row_field(row, task, reason, field):
    fmt = detect_format(row.keys(), row)
    with pytest.raises(RowError) as e:
        convert_row(row, task=task, fmt=fmt, source="data/train.jsonl", index=3)
    assert (e.value.reason, e.value.field, e.value.source, e.value.row) == (reason, field, "data/train.jsonl", 3)
    assert str(e.value).startswith(f"data/train.jsonl: row 3: field '{field}': ")
    assert isinstance(e.value, DataError)
