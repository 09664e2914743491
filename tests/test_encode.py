"""Response-only loss masks and the one truncation rule."""
import pytest
from datasets import Dataset

from stages.core.encode import encode_conversation, encode_preference, encode_sft, fit_prompt_response
from stages.core.errors import DataError
from tiny_models import build_tokenizer

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there!"}, {"role": "user", "content": "Colour?"},
        {"role": "assistant", "content": "Blue."}]


def trained_text(tok, ids, labels):
    return tok.decode([t for t, l in zip(ids, labels) if l != -100])


def test_loss_covers_every_assistant_turn_and_its_end_token_only():
    tok = build_tokenizer()
    ds, rep = encode_sft(Dataset.from_list([{"messages": CONV}]), tok, max_length=None)
    row = ds[0]
    assert trained_text(tok, row["input_ids"], row["labels"]) == "Hello there!<|im_end|>\nBlue.<|im_end|>"
    assert rep.rows == 1 and rep.over_limit == 0


def test_loss_on_last_and_all():
    tok = build_tokenizer()
    ds, _ = encode_sft(Dataset.from_list([{"messages": CONV}]), tok, max_length=None, loss_on="last")
    assert trained_text(tok, ds[0]["input_ids"], ds[0]["labels"]) == "Blue.<|im_end|>"
    ds, _ = encode_sft(Dataset.from_list([{"messages": CONV}]), tok, max_length=None, loss_on="all")
    assert all(l != -100 for l in ds[0]["labels"])


def test_long_rows_keep_the_response_and_trim_the_prompt_start():
    tok = build_tokenizer()
    long_prompt = "word " * 200
    rows = [{"messages": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "Short answer."}]}]
    ds, rep = encode_sft(Dataset.from_list(rows), tok, max_length=40)
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    assert len(ids) == 40
    assert trained_text(tok, ids, labels) == "Short answer.<|im_end|>"
    assert rep.over_limit == 1 and rep.prompt_trimmed == 1 and rep.dropped == 0


def _full(tok, messages):
    """The untruncated encoding, split at the final response."""
    ids, labels, start = encode_conversation(messages, tok, loss_on="last")
    return ids[:start], ids[start:]


def test_response_longer_than_limit_is_cut_at_its_end_and_counted():
    tok = build_tokenizer()
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "blue " * 100}]
    prompt, response = _full(tok, msgs)
    ds, rep = encode_sft(Dataset.from_list([{"messages": msgs}]), tok, max_length=30)
    ids = ds[0]["input_ids"]
    assert len(ids) == 30 and rep.response_cut == 1
    # 30 // 4 = 7 tokens of context (the end of the prompt), then the response's *start*
    assert ids[:7] == prompt[-7:] and ids[7:] == response[:23]
    assert tok.decode(ids[:7]).endswith("<|im_start|>assistant\n")
    assert tok.decode(ds[0]["labels"][7:]).startswith("blue blue")
    assert all(lab == -100 for lab in ds[0]["labels"][:7])


def test_response_exactly_max_length_keeps_a_prompt_token():
    """Old rule (`<=`): a response of exactly max_length kept zero prompt tokens."""
    tok = build_tokenizer()
    msgs = [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "blue " * 10}]
    prompt, response = _full(tok, msgs)
    limit = len(response)
    ds, rep = encode_sft(Dataset.from_list([{"messages": msgs}]), tok, max_length=limit)
    ids = ds[0]["input_ids"]
    keep = max(1, limit // 4)
    assert len(ids) == limit and ids[:keep] == prompt[-keep:] and ids[keep:] == response[:limit - keep]
    assert rep.response_cut == 1 and rep.prompt_trimmed == 0


def test_fit_prompt_response_rule_on_explicit_ids():
    prompt, response = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [100, 101, 102]
    assert fit_prompt_response(prompt, response, 13) == (prompt, response, None)
    assert fit_prompt_response(prompt, response, 8) == ([6, 7, 8, 9, 10], [100, 101, 102], "prompt_trimmed")
    assert fit_prompt_response(prompt, response, 4) == ([10], [100, 101, 102], "prompt_trimmed")
    # the response fills the limit: one prompt token stays, the response loses its end
    assert fit_prompt_response(prompt, response, 3) == ([10], [100, 101], "response_cut")
    long = list(range(100, 120))
    assert fit_prompt_response(prompt, long, 12) == ([8, 9, 10], list(range(100, 109)), "response_cut")
    assert fit_prompt_response([], long, 5) == ([], list(range(100, 105)), "response_cut")
    assert fit_prompt_response([1, 2, 3], [], 2) == ([2, 3], [], "prompt_trimmed")


def test_drop_and_error_policies_count_or_name_the_row():
    tok = build_tokenizer()
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "x " * 100}, {"role": "assistant", "content": "ok"}]}]
    ds, rep = encode_sft(Dataset.from_list(rows), tok, max_length=20, on_long="drop")
    assert len(ds) == 1 and rep.dropped == 1 and rep.examples[0]["row"] == 1
    with pytest.raises(DataError, match="validation: row 1: field 'messages'.*over max_length=20"):
        encode_sft(Dataset.from_list(rows), tok, max_length=20, on_long="error", source="validation")


def _pairs(prompt_words):
    return Dataset.from_list([{"prompt": [{"role": "user", "content": "word " * prompt_words + "Say hi"}],
                               "chosen": [{"role": "assistant", "content": "Hi there!"}],
                               "rejected": [{"role": "assistant", "content": "Go away."}]}])


def test_dpo_layout_keeps_both_responses_and_trims_the_shared_prompt():
    tok = build_tokenizer()
    ds, rep = encode_preference(_pairs(100), tok, max_length=40, layout="dpo")
    row = ds[0]
    assert tok.decode(row["chosen_ids"]) == "Hi there!<|im_end|>\n"
    assert tok.decode(row["rejected_ids"]) == "Go away.<|im_end|>\n"
    assert len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= 40
    assert tok.decode(row["prompt_ids"]).endswith("Say hi<|im_end|>\n<|im_start|>assistant\n")
    assert rep.over_limit == 1 and rep.prompt_trimmed == 1


def test_pair_layout_drop_and_error_name_the_row():
    tok = build_tokenizer()
    ds, rep = encode_preference(_pairs(100), tok, max_length=40, on_long="drop")
    assert len(ds) == 0 and rep.dropped == 1
    with pytest.raises(DataError, match="row 0: field 'chosen/rejected'"):
        encode_preference(_pairs(100), tok, max_length=40, on_long="error")


def test_pair_layout_judges_both_responses_after_the_same_prompt():
    """RM pairs: a short chosen and a long rejected response share one trimmed prompt."""
    tok = build_tokenizer()
    p = [{"role": "user", "content": "word " * 60 + "Which colour?"}]
    chosen, rejected = [{"role": "assistant", "content": "Blue."}], [{"role": "assistant", "content": "It is blue " * 4}]
    prompt, short = _full(tok, p + chosen)
    _, long = _full(tok, p + rejected)
    ds, rep = encode_preference(Dataset.from_list([{"prompt": p, "chosen": chosen, "rejected": rejected}]), tok,
                                max_length=80)
    c, r = ds[0]["chosen_ids"], ds[0]["rejected_ids"]
    kept = 80 - len(long)
    assert len(r) == 80 and c == prompt[-kept:] + short and r == prompt[-kept:] + long
    assert c[:kept] == r[:kept]
    assert rep.over_limit == 1 and rep.prompt_trimmed == 1 and rep.response_cut == 0


def test_ppo_prompts_keep_their_end_including_the_generation_prompt():
    from stages.core.ppo.rollout import encode_prompts

    class Tok:
        def apply_chat_template(self, msgs, **kw):
            return {"input_ids": [1, 2, 3, 4, 5, 6, 7, 99]}  # 99: the assistant header the policy continues from

    ids, report = encode_prompts(Tok(), ["long", "x"], 3)
    assert ids == [[6, 7, 99], [6, 7, 99]] and report.trimmed == 2 and report.rows == 2


@pytest.mark.parametrize("split", ["train", "eval"])
def test_a_long_row_is_named_by_its_file_and_row_not_its_place_in_the_shuffled_split(tmp_path, split):
    import json

    from stages.core.data import load_data

    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return tmp_path / name

    tok = build_tokenizer()
    rows = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "ok"}]}
            for i in range(12)]
    rows[7]["messages"][0]["content"] = "long " * 100
    if split == "train":
        want_file, want_row = write("chats.jsonl", rows), 7
        d = load_data([str(want_file)], task="sft", validation_fraction=0)
    else:
        want_file, want_row = write("held.jsonl", rows[6:9]), 1
        d = load_data([str(write("short.jsonl", rows[:6]))], task="sft", eval_sources=[str(want_file)])
    rows_of_split = d.train if split == "train" else d.eval
    place = next(i for i, r in enumerate(rows_of_split) if r["messages"][0]["content"].startswith("long"))
    with pytest.raises(DataError) as raised:
        encode_sft(rows_of_split, tok, max_length=60, on_long="error", source=split)
    assert raised.value.row == place != want_row  # shuffled: the split's place is not the file's row
    named = str(d.locate(raised.value, split))
    assert named.startswith(f"{want_file}: row {want_row}: field 'messages': ") and "over max_length=60" in named
