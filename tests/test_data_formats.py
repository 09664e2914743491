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


# ------------------------------------------------------------ feedback: a label or rating on the last assistant turn

from stages.core.ratings import check_rating_settings, pair_ratings  # noqa: E402

FEEDBACK = [
    ("messages_label", {"messages": [S("s"), U("q1"), A("a1"), U("q2"), A("a2")], "label": False},
     [{"prompt": [S("s"), U("q1"), A("a1"), U("q2")], "completion": [A("a2")], "label": False}]),
    ("messages_label", {"messages": [U("q"), A("a")], "kto_tag": True},
     [{"prompt": [U("q")], "completion": [A("a")], "label": True}]),
    ("sharegpt_label", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                        "kto_tag": False},
     [{"prompt": [U("q")], "completion": [A("a")], "label": False}]),
    ("messages_rating", {"messages": [U("q"), A("a")], "rating": 0.8},
     [{"prompt": [U("q")], "completion": [A("a")], "label": True}]),
    ("sharegpt_rating", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                         "score": 0.2},
     [{"prompt": [U("q")], "completion": [A("a")], "label": False}]),
    ("prompt_completion_rating", {"prompt": "q", "completion": "a", "score": 0.5},
     [{"prompt": [U("q")], "completion": [A("a")], "label": True}]),
    ("unpaired", {"prompt": "q", "completion": "a", "kto_tag": True},
     [{"prompt": [U("q")], "completion": [A("a")], "label": True}]),
]


@pytest.mark.parametrize("fmt,row,expected", FEEDBACK, ids=[f"{c[0]}-{i}" for i, c in enumerate(FEEDBACK)])
def test_feedback_rows_are_detected_and_become_kto_rows(fmt, row, expected):
    assert detect_format(row.keys(), row, task="unpaired") == fmt
    assert conv(row, "unpaired", fmt=fmt) == expected


def test_feedback_formats_feed_prompts_and_give_way_for_sft():
    row = {"messages": [U("q1"), A("a1"), U("q2"), A("a2")], "rating": 4}
    assert conv(row, "prompt", fmt="messages_rating") == [{"prompt": [U("q1"), A("a1"), U("q2")]}]
    # rated conversations read as plain conversations for SFT, which has no use for the rating
    assert detect_format(row.keys(), row, task="sft") == "messages"
    with pytest.raises(DataError, match="format 'messages_label' cannot be used for task 'sft'"):
        check_task("messages_label", "sft", source="f.jsonl")


def test_rating_threshold_defaults_to_the_middle_of_the_scale():
    def label(rating, **kw):
        return conv({"messages": [U("q"), A("a")], "rating": rating}, "unpaired", fmt="messages_rating", **kw)[0]["label"]

    assert (label(0.49), label(0.5), label(1)) == (False, True, True)  # default scale [0, 1]: 0.5
    assert (label(2.9, rating_scale=[1, 5]), label(3, rating_scale=[1, 5])) == (False, True)
    assert (label(3, rating_scale=[1, 5], rating_threshold=4), label(4, rating_scale=[1, 5], rating_threshold=4)) \
        == (False, True)
    assert label(7, rating_threshold=6) is True  # a threshold alone: no scale check
    with pytest.raises(RowError, match=r"rating 4 is outside the default scale \[0, 1\].*rating_scale") as e:
        label(4)
    assert (e.value.reason, e.value.field) == ("rating_out_of_scale", "rating")
    with pytest.raises(RowError, match=r"rating 6 is outside rating_scale \[1, 5\]"):
        conv({"messages": [U("q"), A("a")], "rating": 6}, "preference", fmt="messages_rating", rating_scale=[1, 5])


def test_feedback_for_preference_gives_rated_rows_to_pair():
    assert conv({"messages": [U("q"), A("a")], "score": 3}, "preference", fmt="messages_rating") == \
        [{"prompt": [U("q")], "completion": [A("a")], "rating": 3.0}]
    assert conv({"messages": [U("q"), A("a")], "label": True}, "preference", fmt="messages_label") == \
        [{"prompt": [U("q")], "completion": [A("a")], "label": True}]


def rated(prompt, *ratings):
    return [{"prompt": [U(prompt)], "completion": [A(f"{prompt}-{i}")], "rating": float(r)}
            for i, r in enumerate(ratings)]


def test_pair_ratings_every_pair_of_different_ratings_with_the_gap_as_margin():
    rows = list(enumerate(rated("q", 1, 3, 3, 5) + rated("solo", 2) + rated("tie", 4, 4)))
    made, alone = pair_ratings(rows, "all")
    got = sorted((p["prompt"][0]["content"], p["chosen"][0]["content"], p["rejected"][0]["content"], p["margin"])
                 for _, p in made)
    assert got == [("q", "q-1", "q-0", 2.0), ("q", "q-2", "q-0", 2.0), ("q", "q-3", "q-0", 4.0),
                   ("q", "q-3", "q-1", 2.0), ("q", "q-3", "q-2", 2.0)]  # 3 vs 3 never pairs
    assert alone == [4, 5, 6]  # the single rating and the tied pair


def test_pair_ratings_extremes_pairs_best_with_worst_only():
    made, alone = pair_ratings(list(enumerate(rated("q", 3, 5, 1, 5, 1))), "extremes")
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"], p["margin"]) for _, p in made] == \
        [("q-1", "q-2", 4.0)]  # the first of equal bests / worsts
    assert alone == [0, 3, 4]


def test_labels_pair_good_with_bad_without_a_margin():
    rows = [{"prompt": [U("q")], "completion": [A(c)], "label": lab} for c, lab in (("g", True), ("b", False), ("g2", True))]
    made, alone = pair_ratings(list(enumerate(rows)))
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for _, p in made] == [("g", "b"), ("g2", "b")]
    assert all("margin" not in p for _, p in made) and alone == []


def test_rating_settings_are_checked():
    check_rating_settings([1, 5], 3, "extremes")
    for kw, key in (({"rating_scale": [5, 1]}, "rating_scale"), ({"rating_scale": [1]}, "rating_scale"),
                    ({"rating_threshold": "high"}, "rating_threshold"), ({"pairs": "extreme"}, "pairs")):
        with pytest.raises(ConfigError, match=key):
            check_rating_settings(**kw)


FEEDBACK_BAD = [
    ({"messages": [U("q"), A("a")], "label": "yes"}, "messages_label", "invalid_label", "label"),
    ({"messages": [U("q"), A("a")], "rating": "good"}, "messages_rating", "invalid_rating", "rating"),
    ({"messages": [U("q"), A("a")], "rating": True}, "messages_rating", "invalid_rating", "rating"),
    ({"messages": [U("q"), A("a")], "rating": None}, "messages_rating", "missing_field", "rating"),
    ({"messages": [U("q"), A("a"), U("more")], "label": True}, "messages_label", "no_assistant_turn", "messages[2].role"),
    ({"messages": [A("a")], "label": True}, "messages_label", "missing_field", "messages"),
    ({"messages": [U("q"), U("q2"), A("a")], "label": True}, "messages_label", "role_order", "messages[1].role"),
    ({"messages": [U("q"), A("")], "label": True}, "messages_label", "empty_content", "messages[1].content"),
    ({"prompt": "q", "completion": "", "rating": 1}, "prompt_completion_rating", "empty_response", "completion"),
]


@pytest.mark.parametrize("row,fmt,reason,field", FEEDBACK_BAD, ids=[b[2] + str(i) for i, b in enumerate(FEEDBACK_BAD)])
def test_bad_feedback_rows_name_file_row_field(row, fmt, reason, field):
    with pytest.raises(RowError) as e:
        convert_row(row, task="unpaired", fmt=fmt, source="data/fb.jsonl", index=5)
    assert (e.value.reason, e.value.field) == (reason, field)
    assert str(e.value).startswith(f"data/fb.jsonl: row 5: field '{field}': ")


def test_prompt_task_reads_rated_conversations_as_plain_ones():
    row = {"messages": [U("q1"), A("a1"), U("q2")], "score": 2}  # no final assistant turn: still a prompt
    assert detect_format(row.keys(), row, task="prompt") == "messages"
    assert conv(row, "prompt", fmt="messages") == [{"prompt": [U("q1"), A("a1"), U("q2")]}]


def test_an_explicit_boolean_label_wins_over_a_score_column():
    """A `score` beside `label` is metadata, not a rating: the row stays unpaired with its own label."""
    row = {"prompt": "p", "completion": "c", "label": False, "score": 0.9}
    fmt = detect_format(row.keys(), row)
    assert fmt == "unpaired"
    assert convert_row(row, task="unpaired", fmt=fmt)[0]["label"] is False
