"""What a user would do without fine-tuning, scored on the same validation split as the trained classifier.

- zero-shot: the instruct base model prompted with the label names; single-label scores each label name's
  log-probability as the reply (softmax over labels), multi-label asks "yes or no" per label and takes
  P(yes) / (P(yes) + P(no)) with a threshold tuned on validation like the trained model's;
- TF-IDF + logistic regression (scikit-learn), trained on the same training rows, so a user sees whether a
  language model was worth it at all.
"""
from __future__ import annotations

import numpy as np

from .classify_data import render_input
from .classify_metrics import classification_metrics, softmax
from .classify_model import encode_text

SINGLE_PROMPT = ("Classify the text into exactly one of these categories: {labels}.\n\nText: {text}\n\n"
                 "Answer with the category name only.")
MULTI_PROMPT = ("Does the text below belong to the category \"{label}\"? Answer yes or no.\n\nText: {text}")


def _continuation_logprobs(model, tokenizer, prompt: str, continuations: list[str]) -> np.ndarray:
    """Sum of log P(continuation tokens | prompt rendered as a chat with the generation prompt), per continuation.

    The prompt is run once; its cache is repeated for the continuations (one label name per row of a batch)."""
    import torch

    device = next(model.parameters()).device
    head = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids_p = torch.tensor([tokenizer(head, add_special_tokens=False)["input_ids"]], device=device)
    conts = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
    out = model(input_ids=ids_p, use_cache=True)
    first = torch.log_softmax(out.logits[0, -1].float(), -1)
    scores = np.array([first[c[0]].item() for c in conts])
    longest = max(len(c) for c in conts)
    if longest == 1:
        return scores
    n, pad = len(conts), tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cache = out["cache"] if "cache" in out else out["past_key_values"]  # renamed in transformers 5.2x
    cache.batch_repeat_interleave(n)
    ids = torch.full((n, longest - 1), pad, dtype=torch.long, device=device)
    mask = torch.zeros((n, ids_p.shape[1] + longest - 1), dtype=torch.long, device=device)
    mask[:, :ids_p.shape[1]] = 1
    for i, c in enumerate(conts):
        ids[i, :len(c) - 1] = torch.tensor(c[:-1])
        mask[i, ids_p.shape[1]:ids_p.shape[1] + len(c) - 1] = 1
    import inspect

    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # renamed in 5.2x
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, **{key: cache}).logits.float(), -1)
    for i, c in enumerate(conts):
        scores[i] += sum(logp[i, j, c[j + 1]].item() for j in range(len(c) - 1))
    return scores


def _scored(model, fn):
    """Run `fn` without gradients, in bf16 autocast where the CPU has bf16 matmuls (several times faster)."""
    import torch

    from .runtime import cpu_supports_bf16

    model.eval()
    on_cpu = next(model.parameters()).device.type == "cpu"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=on_cpu and cpu_supports_bf16()):
        return fn()


def zero_shot(model, tokenizer, rows, labels: list[str], *, multi_label: bool, max_length: int | None,
              log=print) -> dict:
    """Zero-shot metrics of a causal LM on classification rows (see the module docstring)."""
    texts = []
    for r in rows:
        ids = encode_text(render_input(r), tokenizer, max_length, "right")  # the same cut as the classifier's
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    n = len(labels)
    if multi_label:
        def run():
            return [[_continuation_logprobs(model, tokenizer, MULTI_PROMPT.format(label=lab, text=t), ["yes", "no"])
                     for lab in labels] for t in texts]
        yes_no = np.array(_scored(model, run))  # rows x labels x (yes, no)
        probs = 1.0 / (1.0 + np.exp(yes_no[..., 1] - yes_no[..., 0]))
    else:
        def run():
            return [_continuation_logprobs(model, tokenizer, SINGLE_PROMPT.format(labels=", ".join(labels), text=t),
                                           labels) for t in texts]
        probs = softmax(np.array(_scored(model, run)))
    truth = [r["labels"] for r in rows]
    metrics = classification_metrics(probs, truth, labels, multi_label=multi_label)
    log(f"zero-shot base: macro-F1 {metrics['macro_f1']:.3f}, accuracy {metrics['accuracy']:.3f}")
    return metrics


def tfidf_logistic_regression(train_rows, eval_rows, labels: list[str], *, multi_label: bool,
                              class_weight: str | None = None, seed: int = 0, log=print) -> dict:
    """TF-IDF (word 1-2 grams) + logistic regression, trained on the training rows, scored on validation."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    from .classify_metrics import multi_hot

    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    x_train = vec.fit_transform([render_input(r) for r in train_rows])
    x_eval = vec.transform([render_input(r) for r in eval_rows])
    n = len(labels)
    lr = LogisticRegression(max_iter=2000, class_weight=class_weight, random_state=seed)
    if multi_label:
        y = multi_hot([r["labels"] for r in train_rows], n)
        present = [j for j in range(n) if 0 < y[:, j].sum() < len(y)]
        probs = np.zeros((len(eval_rows), n))
        probs[:, [j for j in range(n) if y[:, j].all()]] = 1.0
        if present:
            clf = OneVsRestClassifier(lr).fit(x_train, y[:, present])
            probs[:, present] = clf.predict_proba(x_eval)
    else:
        y = np.array([r["labels"][0] for r in train_rows])
        clf = lr.fit(x_train, y)
        probs = np.zeros((len(eval_rows), n))
        probs[:, clf.classes_] = clf.predict_proba(x_eval)
    metrics = classification_metrics(probs, [r["labels"] for r in eval_rows], labels, multi_label=multi_label)
    log(f"TF-IDF + logistic regression: macro-F1 {metrics['macro_f1']:.3f}, accuracy {metrics['accuracy']:.3f}")
    return metrics
