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


def _continuation_logprobs(model, tokenizer, prompts: list[str], continuations: list[str], batch_size: int) -> np.ndarray:
    """Sum of log P(continuation tokens | prompt rendered as a chat with the generation prompt), per pair."""
    import torch

    device = next(model.parameters()).device
    seqs = []
    for p, c in zip(prompts, continuations):
        head = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids_p = tokenizer(head, add_special_tokens=False)["input_ids"]
        ids_c = tokenizer(c, add_special_tokens=False)["input_ids"]
        seqs.append((ids_p, ids_c))
    out = np.zeros(len(seqs))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.eval()
    with torch.no_grad():
        for s in range(0, len(seqs), batch_size):
            chunk = seqs[s:s + batch_size]
            width = max(len(p) + len(c) for p, c in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, (p, c) in enumerate(chunk):
                ids[i, :len(p) + len(c)] = torch.tensor(p + c)
                mask[i, :len(p) + len(c)] = 1
            logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1).cpu()
            for i, (p, c) in enumerate(chunk):
                positions = torch.arange(len(p) - 1, len(p) + len(c) - 1)
                out[s + i] = logp[i, positions, torch.tensor(c)].sum().item()
    return out


def zero_shot(model, tokenizer, rows, labels: list[str], *, multi_label: bool, max_length: int | None,
              batch_size: int = 16, log=print) -> dict:
    """Zero-shot metrics of a causal LM on classification rows (see the module docstring)."""
    texts = []
    for r in rows:
        ids = encode_text(render_input(r), tokenizer, max_length, "right")  # the same cut as the classifier's
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    n = len(labels)
    if multi_label:
        prompts = [MULTI_PROMPT.format(label=lab, text=t) for t in texts for lab in labels]
        yes = _continuation_logprobs(model, tokenizer, prompts, ["yes"] * len(prompts), batch_size)
        no = _continuation_logprobs(model, tokenizer, prompts, ["no"] * len(prompts), batch_size)
        probs = (1.0 / (1.0 + np.exp(no - yes))).reshape(len(texts), n)
    else:
        prompt = [SINGLE_PROMPT.format(labels=", ".join(labels), text=t) for t in texts]
        scores = _continuation_logprobs(model, tokenizer, [p for p in prompt for _ in labels], labels * len(texts),
                                        batch_size)
        probs = softmax(scores.reshape(len(texts), n))
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
