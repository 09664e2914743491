"""Classify stage on tiny models: learns synthetic tasks from chance, predicts what it measured, exports a
standalone classifier that transformers' pipeline loads in a fresh process, and refuses what cannot work."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from classify_synthetic import multi_rows, single_rows
from stages import classify, predict
from stages.core.errors import ConfigError
from synthetic import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes/tiny/classify.yaml")


def run_classify(model, out, train, held, *extra):
    return classify.main(["--config", TINY, "--model_name_or_path", str(model), "--output_dir", str(out),
                          "--datasets", train, "--eval_datasets", held, *extra])


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.slow
def test_single_label_rises_from_chance_and_predict_reproduces_the_measured_scores(tiny_llama, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", single_rows(160, seed=0))
    held_rows = single_rows(40, seed=1)
    held = write_jsonl(tmp_path / "held.jsonl", held_rows)
    out = tmp_path / "cls"
    run_classify(tiny_llama, out, train, held, "--metric_for_best_model", "macro_f1",
                 "--early_stopping_patience", "3")
    m = json.loads((out / "manifest.json").read_text())
    res = m["metrics"]["classification"]
    assert res["untrained_head"]["macro_f1"] < 0.5, res["untrained_head"]  # 4 classes: chance is ~0.25
    assert res["trained"]["macro_f1"] >= 0.9, res["trained"]
    assert res["tfidf_logreg"]["macro_f1"] >= 0.9  # the baseline is computed on the same split
    assert set(res["trained"]["per_class"]) == {"alpha", "beta", "delta", "gamma"}
    assert (out / "confusion_final.png").is_file() and (out / "labels.json").is_file()
    assert json.loads((out / "labels.json").read_text())["labels"] == ["alpha", "beta", "delta", "gamma"]
    card = (out / "README.md").read_text()
    assert "tfidf_logreg" in card and "untrained_head" in card

    preds = tmp_path / "preds.jsonl"
    predict.main([str(out), "--input", held, "--output", str(preds), "--batch-size", "7", "--top-k", "2"])
    rows = read_jsonl(preds)
    assert len(rows) == len(held_rows) and all(len(r["top_k"]) == 2 for r in rows)
    assert [r["label"] for r in rows] == [h["label"] for h in held_rows]  # the input's gold labels are kept
    accuracy = sum(r["predicted_label"] == h["label"] for r, h in zip(rows, held_rows)) / len(rows)
    assert accuracy == pytest.approx(res["trained"]["accuracy"])  # the saved model is the one measured

    # the export: a standalone AutoModelForSequenceClassification, loaded by pipeline in a fresh process
    from stages import export

    exp = tmp_path / "export"
    export.main([str(out), "--out", str(exp), "--dtype", "float32"])
    script = ("import json, sys\nfrom transformers import pipeline\n"
              "clf = pipeline('text-classification', model=sys.argv[1], top_k=None)\n"
              "rows = [json.loads(l) for l in open(sys.argv[2])]\n"
              "print(json.dumps([{d['label']: d['score'] for d in out} for out in clf([r['text'] for r in rows])]))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(exp), held], capture_output=True, text=True,
                          cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    piped = json.loads(proc.stdout.strip().splitlines()[-1])
    for p, r in zip(piped, rows):
        assert set(p) == set(r["scores"])  # label names, not LABEL_0
        assert all(abs(p[k] - r["scores"][k]) < 1e-4 for k in p)


@pytest.mark.slow
def test_multi_label_rises_from_chance_with_a_tuned_threshold_that_predict_applies(tiny_llama, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", multi_rows(200, seed=0))
    held_rows = multi_rows(40, seed=1)
    held = write_jsonl(tmp_path / "held.jsonl", held_rows)
    out = tmp_path / "cls"
    run_classify(tiny_llama, out, train, held, "--multi_label", "true", "--num_train_epochs", "5")
    m = json.loads((out / "manifest.json").read_text())
    res = m["metrics"]["classification"]
    assert res["untrained_head"]["macro_f1"] < 0.7, res["untrained_head"]  # every label "yes" scores ~0.55
    assert res["trained"]["macro_f1"] >= 0.9, res["trained"]
    info = json.loads((out / "labels.json").read_text())
    assert info["multi_label"] and info["threshold"] == res["trained"]["threshold"] == m["threshold"]
    assert sum(map(sum, res["trained"]["confusion_matrix"]["alpha"])) == len(held_rows)  # per-label 2x2
    preds = tmp_path / "preds.jsonl"
    predict.main([str(out), "--input", held, "--output", str(preds)])
    rows = read_jsonl(preds)
    exact = sum(sorted(r["predicted_labels"]) == h["labels"] for r, h in zip(rows, held_rows)) / len(rows)
    assert exact == pytest.approx(res["trained"]["accuracy"])  # predict applies the tuned threshold


@pytest.mark.slow
def test_lora_classifier_saves_its_head_and_reloads_to_the_measured_predictions(tiny_qwen2, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", single_rows(48, seed=0))
    held_rows = single_rows(24, seed=1)
    held = write_jsonl(tmp_path / "held.jsonl", held_rows)
    out = tmp_path / "cls"
    run_classify(tiny_qwen2, out, train, held, "--peft_method", "lora", "--lora_r", "4", "--num_train_epochs", "1",
                 "--learning_rate", "1e-2")
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert any("score" in k for k in f.keys())
    m = json.loads((out / "manifest.json").read_text())
    preds = tmp_path / "preds.jsonl"
    predict.main([str(out), "--input", held, "--output", str(preds)])
    rows = read_jsonl(preds)
    trained, start = m["metrics"]["classification"]["trained"], m["metrics"]["classification"]["untrained_head"]
    correct = sum(r["predicted_label"] == h["label"] for r, h in zip(rows, held_rows))
    assert correct / len(rows) == pytest.approx(trained["accuracy"])
    # the reloaded head is the trained one: its predictions differ from the untrained head's confusion matrix
    counts = [sum(r["predicted_label"] == lab for r in rows) for lab in ("alpha", "beta", "delta", "gamma")]
    assert counts == [sum(col) for col in zip(*trained["confusion_matrix"])]
    assert trained["confusion_matrix"] != start["confusion_matrix"]


def test_prefix_tuning_is_refused_with_the_reason_before_any_data_is_read(tiny_llama, tmp_path):
    train = str(tmp_path / "not-written-yet.jsonl")  # refused first: the data is never opened
    held = write_jsonl(tmp_path / "held.jsonl", single_rows(8, seed=1))
    with pytest.raises(ConfigError, match="prefix tuning needs past key values"):
        run_classify(tiny_llama, tmp_path / "cls", train, held, "--peft_method", "prefix", "--tfidf_baseline", "false")
    assert not (tmp_path / "cls").exists()


def test_cli_exits_2_with_file_row_field_on_an_unknown_label(tiny_llama, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", single_rows(8, seed=0))
    proc = subprocess.run([sys.executable, "-m", "stages.cli", "classify", "--config", TINY, "--model_name_or_path",
                           str(tiny_llama), "--datasets", train, "--output_dir", str(tmp_path / "cls"),
                           "--labels", "alpha", "beta", "gamma", "deltta"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-1500:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "train.jsonl: row 3: field 'label': unknown label 'delta'" in last and "closest valid label: 'deltta'" in last
    assert not (tmp_path / "cls").exists()
