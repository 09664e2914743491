"""Classification metrics: threshold tuning, calibration, truncation and padding-correct scoring."""
import numpy as np
import pytest

from stages.core.classify_metrics import classification_metrics, expected_calibration_error, tune_threshold


def test_threshold_tuning_finds_the_threshold_that_separates_positives():
    # positives score 0.70-0.80 and negatives 0.30-0.60: only a threshold in (0.60, 0.70] is perfect,
    # and 0.5 (the default) would call two negatives positive
    probs = np.array([[0.80, 0.30], [0.70, 0.55], [0.60, 0.75], [0.35, 0.72]])
    truth = np.array([[1, 0], [1, 0], [0, 1], [0, 1]])
    threshold, f1 = tune_threshold(probs, truth)
    assert 0.60 < threshold <= 0.70 and f1 == 1.0
    assert classification_metrics(probs, [[0], [0], [1], [1]], ["x", "y"], multi_label=True)["threshold"] == threshold


def test_expected_calibration_error_of_an_overconfident_model():
    assert expected_calibration_error(np.full(10, 0.9), np.array([1, 0] * 5)) == pytest.approx(0.4)
    assert expected_calibration_error(np.full(4, 0.75), np.array([1, 1, 1, 0])) == pytest.approx(0.0)


def test_single_label_metrics_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    m = classification_metrics(probs, [0, 0, 1, 1], ["a", "b"], multi_label=False)
    assert m["accuracy"] == 0.75 and m["confusion_matrix"] == [[2, 0], [1, 1]]
    assert m["per_class"]["a"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_truncation_cuts_the_end_by_default_and_keeps_it_with_left_and_counts(tiny_llama):
    from transformers import AutoTokenizer

    from stages.core.classify_model import encode_text
    from stages.core.encode import LengthReport

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    text = " ".join(f"word{i}" for i in range(40))
    full = tok(text)["input_ids"]
    report = LengthReport()
    assert encode_text(text, tok, 10, "right", report) == full[:10]
    assert encode_text(text, tok, 10, "left", report) == full[-10:]
    assert encode_text("short", tok, 10, "right", report) == tok("short")["input_ids"]
    assert (report.rows, report.over_limit, report.response_cut, report.prompt_trimmed) == (3, 2, 1, 1)


@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_scores_equal_one_at_a_time_whatever_the_padding_side(tiny_llama, side):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from stages.core.classify_model import score_texts

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.padding_side = side
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=3)
    texts = ["a", "the quick brown fox jumps over the lazy dog again and again", "hello there"]
    batched = score_texts(model, tok, texts, max_length=64, batch_size=3)
    single = np.concatenate([score_texts(model, tok, [t], max_length=64, batch_size=1) for t in texts])
    assert np.allclose(batched, single, atol=1e-5)
    assert not np.allclose(batched[0], batched[1], atol=1e-3)  # the rows really differ


def test_zero_shot_label_scores_equal_the_log_probability_of_the_whole_sequence(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.core.classify_baselines import _continuation_logprobs

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    labels = ["red", "blue green", "a longer label name"]
    with torch.no_grad():
        got = _continuation_logprobs(model, tok, "Which colour?", labels)
        head = tok.apply_chat_template([{"role": "user", "content": "Which colour?"}], tokenize=False,
                                       add_generation_prompt=True)
        p = tok(head, add_special_tokens=False)["input_ids"]
        for label, score in zip(labels, got):
            c = tok(label, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].float(), -1)
            expected = sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(c))
            assert score == pytest.approx(expected, abs=1e-4)


def test_balanced_class_weights_scale_each_rows_loss_by_its_class_weight_hand_computed():
    """logits [2, 0] for two rows, labels 0 and 1: per-row losses ln(1+e^-2) = 0.1269 and ln(1+e^2) = 2.1269;
    with weights (1, 3): (0.1269 + 3 x 2.1269) / 2 rows = 3.2538 (unweighted: 1.1269)."""
    import math
    import types

    import torch

    from stages.classify import _loss

    out = types.SimpleNamespace(logits=torch.tensor([[2.0, 0.0], [2.0, 0.0]]))
    got = _loss([1.0, 3.0], multi_label=False)(out, torch.tensor([0, 1]))
    want = (math.log1p(math.exp(-2)) + 3 * math.log1p(math.exp(2))) / 4
    # each row's loss times its class weight, averaged over rows (not over the weights: that is what lets
    # accumulated micro-batches add up): (0.1269 + 3 x 2.1269) / 2
    assert float(got) == pytest.approx(want * 4 / 2, rel=1e-5)
    # under gradient accumulation transformers passes the items of the whole accumulated batch: 4 rows here
    half = _loss([1.0, 3.0], multi_label=False)(out, torch.tensor([0, 1]), num_items_in_batch=4)
    assert float(half) == pytest.approx(want * 4 / 4, rel=1e-5)
    assert _loss(None, multi_label=False) is None  # no weights: the model's own loss
    # multi-label: positive weights scale only the positive targets; logits 0 give ln 2 per element
    multi = _loss([3.0, 1.0], multi_label=True)(types.SimpleNamespace(logits=torch.zeros(1, 2)), torch.tensor([[1, 0]]))
    assert float(multi) == pytest.approx((3 * math.log(2) + math.log(2)) / 2, rel=1e-5)


def test_predict_refuses_to_write_over_its_own_input(tmp_path):
    from stages import predict
    from stages.core.errors import ConfigError

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "hello"}\n')
    with pytest.raises(ConfigError, match="is the input file"):
        predict.main([str(tmp_path / "no-run"), "--input", str(rows), "--output", str(rows)])
    assert rows.read_text() == '{"text": "hello"}\n'
