"""Response-only loss masks and the one truncation rule."""
import pytest
from datasets import Dataset

from stages.core.encode import encode_sft
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


def test_response_longer_than_limit_is_cut_at_its_end_and_counted():
    tok = build_tokenizer()
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "blue " * 100}]}]
    ds, rep = encode_sft(Dataset.from_list(rows), tok, max_length=30)
    assert len(ds[0]["input_ids"]) == 30 and rep.response_cut == 1


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
    from stages.core.encode import encode_preference

    tok = build_tokenizer()
    ds, rep = encode_preference(_pairs(100), tok, max_length=40, layout="dpo")
    row = ds[0]
    assert tok.decode(row["chosen_ids"]) == "Hi there!<|im_end|>\n"
    assert tok.decode(row["rejected_ids"]) == "Go away.<|im_end|>\n"
    assert len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= 40
    assert tok.decode(row["prompt_ids"]).endswith("Say hi<|im_end|>\n<|im_start|>assistant\n")
    assert rep.over_limit == 1 and rep.prompt_trimmed == 1


def test_pair_layout_drop_and_error_name_the_row():
    from stages.core.encode import encode_preference

    tok = build_tokenizer()
    ds, rep = encode_preference(_pairs(100), tok, max_length=40, on_long="drop")
    assert len(ds) == 0 and rep.dropped == 1
    with pytest.raises(DataError, match="row 0: field 'chosen/rejected'"):
        encode_preference(_pairs(100), tok, max_length=40, on_long="error")
