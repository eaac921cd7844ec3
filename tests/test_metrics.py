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
    probs[7, :4] = 0.5                                 # exactly at the threshold
    ours = f1_scores(labels, probs, "torchmetrics-1")
    pred = (probs > 0.5).astype(int)
    for avg in ("macro", "micro", "weighted", "samples"):
        ref = f1_score(labels.astype(int), pred, average=avg, zero_division=0)
        assert ours[f"f1_{avg}"] == pytest.approx(ref, abs=1e-12), avg


def present_classes_macro_by_a_loop(labels, probs):
    """torchmetrics 0.9.3's macro F1 as MAP's my_metrics.F1_Score calls it, written out: predicted at p >= 0.5, one
    F1 per class, the mean over the classes with tp + fp + fn > 0 only."""
    scores = []
    for c in range(labels.shape[1]):
        tp = sum(1 for i in range(len(labels)) if labels[i, c] == 1 and probs[i, c] >= 0.5)
        fp = sum(1 for i in range(len(labels)) if labels[i, c] == 0 and probs[i, c] >= 0.5)
        fn = sum(1 for i in range(len(labels)) if labels[i, c] == 1 and probs[i, c] < 0.5)
        if tp + fp + fn > 0:
            precision = tp / (tp + fp) if tp + fp else 0.0
            recall = tp / (tp + fn) if tp + fn else 0.0
            scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(scores) / len(scores)


@pytest.mark.parametrize("seed", range(5))
def test_multilabel_f1_torchmetrics_09(seed):
    rng = np.random.default_rng(seed)
    labels = (rng.random((60, 23)) < 0.15).astype(np.float32)
    labels[:, [5, 9]] = 0                              # genres with no positives ...
    probs = rng.random((60, 23))
    probs[:, [5, 9]] = 0.1                             # ... and no predictions: left out of the macro mean
    probs[7, :4] = 0.5                                 # exactly at the threshold: predicted
    labels[:, 11], probs[:, 11] = 0, 0.2               # a genre with no positives but one prediction: in the mean (0)
    probs[0, 11] = 0.9
    labels[3], probs[3] = 0, 0.0
    ours = f1_scores(labels, probs, "torchmetrics-0.9")
    assert ours["f1_macro"] == pytest.approx(present_classes_macro_by_a_loop(labels, probs), abs=1e-12)
    pred = (probs >= 0.5).astype(int)
    present = [c for c in range(23) if labels[:, c].any() or pred[:, c].any()]
    assert ours["f1_macro"] == pytest.approx(f1_score(labels.astype(int), pred, average="macro", labels=present))
    for avg in ("micro", "weighted", "samples"):
        ref = f1_score(labels.astype(int), pred, average=avg, zero_division=0)
        assert ours[f"f1_{avg}"] == pytest.approx(ref, abs=1e-12), avg
    assert ours["f1_macro"] > f1_scores(labels, probs, "torchmetrics-1")["f1_macro"]


def test_threshold_per_definition():
    labels = np.array([[1, 0], [0, 1]])
    probs = np.array([[0.5, 0.2], [0.1, 0.9]])         # 0.5 is predicted by torchmetrics 0.9, not by >= 1
    assert f1_scores(labels, probs, "torchmetrics-1")["f1_macro"] == pytest.approx(
        f1_score(labels, (probs > 0.5).astype(int), average="macro", zero_division=0))
    assert f1_scores(labels, probs, "torchmetrics-0.9")["f1_macro"] == 1.0


def test_multilabel_reports_the_chosen_definition_and_keeps_the_other():
    labels = np.array([[1, 0, 0], [0, 1, 0]])
    probs = np.array([[0.9, 0.1, 0.1], [0.2, 0.8, 0.1]])   # class 2 never seen: 1.0 vs 2/3
    for chosen in ("torchmetrics-0.9", "torchmetrics-1"):
        m = compute_metrics("multilabel", labels, probs, chosen)
        assert m["f1_macro"] == m[f"f1_macro_{chosen}"]
        assert (m["f1_macro_torchmetrics-0.9"], m["f1_macro_torchmetrics-1"]) == (1.0, pytest.approx(2 / 3))


@pytest.mark.parametrize("task,scores", [("multiclass", [[0.1, np.nan], [0.5, 0.5]]), ("binary", [np.nan, 0.4]),
                                         ("multilabel", [[np.inf, 0.1], [0.2, 0.3]])])
def test_non_finite_scores_are_refused(task, scores):
    labels = [[1, 0], [0, 1]] if task == "multilabel" else [0, 1]
    with pytest.raises(FloatingPointError, match="non-finite"):
        compute_metrics(task, labels, np.array(scores))


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
    {"file": "common.py", "old": "else probs > 0.5", "new": "else probs >= 0.5",
     "why": "torchmetrics-1 F1: predictions at p >= 0.5 instead of p > 0.5"},
    {"file": "common.py", "old": "p = probs >= 0.5 if", "new": "p = probs > 0.5 if",
     "why": "torchmetrics-0.9 F1: predictions at p > 0.5 instead of p >= 0.5"},
    {"file": "common.py", "old": "macro_classes = seen if definition", "new": "macro_classes = (tp + fn > 0) if definition",
     "why": "torchmetrics-0.9 F1-Macro leaves out classes without positives instead of classes never seen"},
    {"file": "common.py", "old": "else np.ones(len(tp), dtype=bool)", "new": "else seen",
     "why": "torchmetrics-1 F1-Macro leaves out classes never seen (they count 0)"},
    {"file": "common.py", "old": "return compute_metrics(run.task, dataset.labels(), scores, run.args.f1)",
     "new": "return compute_metrics(run.task, dataset.labels(), scores)",
     "why": "evaluation ignores --f1 (the method's official F1 definition)",
     "tests": ["tests/test_protocol.py::test_the_reported_f1_is_the_chosen_definition"]},
    {"file": "common.py", "old": "    if not np.isfinite(scores).all():", "new": "    if False:",
     "why": "metrics computed from non-finite scores (NaN guard)"},
    {"file": "common.py", "old": "\"f1_samples\": float(samples.mean())}", "new": "\"f1_samples\": float(samples[row_den > 0].mean())}",
     "why": "F1-samples skips rows with no true and no predicted label"},
    {"file": "common.py", "old": "\"f1_weighted\": float((per_class * support).sum() / support.sum())",
     "new": "\"f1_weighted\": float(per_class.mean())", "why": "weighted F1 ignores the class support"},
    {"file": "common.py", "old": "(np.cumsum(counts) - (counts - 1) / 2)[group]", "new": "(np.cumsum(counts) - (counts - 1))[group]",
     "why": "AUROC gives a tie group its lowest rank instead of the average rank"},
]
