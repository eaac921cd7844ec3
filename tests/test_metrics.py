"""Metrics against scikit-learn (the oracle) on random inputs, ties and edge cases."""
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from common import accuracy, auroc, compute_metrics, f1_scores


@pytest.mark.parametrize("seed", range(5))
def test_accuracy(seed):
    rng = np.random.default_rng(seed)
    scores, labels = rng.normal(size=(200, 7)), rng.integers(0, 7, 200)
    assert accuracy(labels, scores) == pytest.approx(accuracy_score(labels, scores.argmax(1)))


@pytest.mark.parametrize("seed", range(5))
def test_multilabel_f1(seed):
    rng = np.random.default_rng(seed)
    labels = (rng.random((100, 23)) < 0.15).astype(np.float32)
    labels[:, 5] = 0                                   # a genre with no positives
    probs = rng.random((100, 23))
    probs[:, 5] = 0.1                                  # ... and no predictions: scores 0 in macro
    probs[3] = 0.0
    labels[3] = 0                                      # a row with no true and no predicted label
    ours = f1_scores(labels, probs)
    pred = (probs > 0.5).astype(int)
    for avg in ("macro", "micro", "weighted", "samples"):
        ref = f1_score(labels.astype(int), pred, average=avg, zero_division=0)
        assert ours[f"f1_{avg}"] == pytest.approx(ref, abs=1e-12), avg


def test_threshold_is_strict():
    labels = np.array([[1, 0], [0, 1]])
    probs = np.array([[0.5, 0.2], [0.1, 0.9]])         # 0.5 is not > 0.5
    pred = (probs > 0.5).astype(int)
    assert f1_scores(labels, probs)["f1_macro"] == pytest.approx(f1_score(labels, pred, average="macro", zero_division=0))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_random_and_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = rng.random(300)
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    tied = np.round(rng.random(300), 1)                # many ties
    assert auroc(labels, tied) == pytest.approx(roc_auc_score(labels, tied), abs=1e-12)


def test_auroc_single_class_is_nan():
    assert np.isnan(auroc(np.ones(5), np.random.rand(5)))   # undefined, as scikit-learn (which warns) says
    with pytest.warns(Warning):
        assert np.isnan(roc_auc_score(np.ones(5), np.random.rand(5)))


def test_compute_metrics_names():
    assert set(compute_metrics("multiclass", [0, 1], np.eye(2))) == {"accuracy"}
    assert {"f1_macro", "f1_micro", "f1_weighted", "f1_samples"} <= set(compute_metrics("multilabel", np.eye(2), np.eye(2)))
    assert compute_metrics("binary", [0, 1], [0.2, 0.8])["auroc"] == 1.0


# Semantic breaks of common.py's metrics these tests must catch (python tests/mutations.py --file common.py).
MUTATIONS = [
    {"file": "common.py", "old": "np.asarray(probs) > threshold", "new": "np.asarray(probs) >= threshold",
     "why": "multi-label predictions at p >= 0.5 instead of p > 0.5"},
    {"file": "common.py", "old": "\"f1_macro\": float(per_class.mean()),",
     "new": "\"f1_macro\": float(per_class[support > 0].mean()),",
     "why": "F1-Macro skips classes without positives (scores them as absent, not 0)"},
    {"file": "common.py", "old": "\"f1_samples\": float(samples.mean())}", "new": "\"f1_samples\": float(samples[row_den > 0].mean())}",
     "why": "F1-samples skips rows with no true and no predicted label"},
    {"file": "common.py", "old": "\"f1_weighted\": float((per_class * support).sum() / support.sum())",
     "new": "\"f1_weighted\": float(per_class.mean())", "why": "weighted F1 ignores the class support"},
    {"file": "common.py", "old": "(np.cumsum(counts) - (counts - 1) / 2)[group]", "new": "(np.cumsum(counts) - (counts - 1))[group]",
     "why": "AUROC gives a tie group its lowest rank instead of the average rank"},
]
