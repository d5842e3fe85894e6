"""Classification metrics against a hand-computed confusion matrix and a direct Mann-Whitney AUC."""
import itertools
import json
import math

import numpy as np
import pytest

from utils.classification_metrics import (
    aggregate_probabilities,
    classification_report,
    confusion_matrix,
    format_report,
    one_vs_rest_auc,
    per_class_rates,
    roc_auc,
    roc_curve,
    row_normalised,
    to_jsonable,
)

# 10 cases, worked out by hand below.
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
Y_PRED = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1]


def test_confusion_matrix_matches_hand_count():
    # true 0 -> predicted 0,0,1,2; true 1 -> 1,1,0; true 2 -> 2,2,1
    expected = np.array([[2, 1, 1],
                         [1, 2, 0],
                         [0, 1, 2]])
    np.testing.assert_array_equal(confusion_matrix(Y_TRUE, Y_PRED, num_classes=3), expected)


def test_confusion_matrix_matches_pair_loop_on_random_labels():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    loop = np.zeros((4, 4), dtype=int)
    for t, q in zip(y, p):
        loop[t, q] += 1
    np.testing.assert_array_equal(confusion_matrix(y, p, num_classes=4), loop)


def test_per_class_rates_match_hand_computation():
    rates = per_class_rates(confusion_matrix(Y_TRUE, Y_PRED, num_classes=3))
    # class 0: TP 2, FN 2, FP 1, TN 5; class 1: TP 2, FN 1, FP 2, TN 5; class 2: TP 2, FN 1, FP 1, TN 6
    np.testing.assert_allclose(rates["sensitivity"], [2 / 4, 2 / 3, 2 / 3])
    np.testing.assert_allclose(rates["specificity"], [5 / 6, 5 / 7, 6 / 7])
    np.testing.assert_allclose(rates["ppv"], [2 / 3, 2 / 4, 2 / 3])
    np.testing.assert_allclose(rates["f1"], [4 / 7, 4 / 7, 4 / 6])


def test_empty_class_gives_nan_not_zero():
    matrix = confusion_matrix([0, 0, 1], [0, 1, 1], num_classes=3)
    rates = per_class_rates(matrix)
    assert math.isnan(rates["sensitivity"][2]) and math.isnan(rates["ppv"][2])
    assert np.isnan(row_normalised(matrix)[2]).all()


def mann_whitney_auc(y, s):
    """P(score of a positive > score of a negative) + half the ties, over all pairs."""
    pos = [b for a, b in zip(y, s) if a]
    neg = [b for a, b in zip(y, s) if not a]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_auc_matches_mann_whitney_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    y[:2] = [0, 1]
    s = np.round(rng.random(60) + 0.3 * y, 1)  # rounding creates many ties
    assert roc_auc(y, s) == pytest.approx(mann_whitney_auc(y, s), abs=1e-12)


def test_roc_curve_endpoints_and_monotone():
    fpr, tpr, thr = roc_curve([0, 1, 1, 0, 1], [0.1, 0.9, 0.4, 0.4, 0.8])
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert thr[0] == np.inf and len(thr) == 4 + 1  # four distinct scores


def test_one_vs_rest_auc_and_macro_mean():
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1, 2], 20)
    probs = rng.dirichlet([1, 1, 1], 60)
    aucs, macro = one_vs_rest_auc(y, probs)
    for k in range(3):
        assert aucs[k] == pytest.approx(mann_whitney_auc(y == k, probs[:, k]))
    assert macro == pytest.approx(np.mean(aucs))


def test_one_vs_rest_auc_skips_absent_class():
    aucs, macro = one_vs_rest_auc([0, 1, 0, 1], np.array([[.8, .1, .1], [.2, .7, .1], [.6, .3, .1], [.5, .4, .1]]))
    assert math.isnan(aucs[2]) and macro == pytest.approx(np.mean(aucs[:2]))


def test_matches_sklearn_when_installed():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(7)
    y = np.repeat([0, 1, 2], 15)
    probs = rng.dirichlet([1, 1, 1], 45)
    aucs, macro = one_vs_rest_auc(y, probs)
    assert macro == pytest.approx(metrics.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    np.testing.assert_array_equal(confusion_matrix(y, probs.argmax(1), num_classes=3),
                                  metrics.confusion_matrix(y, probs.argmax(1)))


def test_report_accuracy_and_printed_layout():
    probs = np.eye(3)[Y_PRED] * 0.8 + 0.2 / 3
    report = classification_report(Y_TRUE, probs)
    assert report["accuracy"] == pytest.approx(6 / 10)
    np.testing.assert_array_equal(report["confusion_matrix"], confusion_matrix(Y_TRUE, Y_PRED, num_classes=3))
    text = format_report(report, class_names=("Control", "CP", "COVID-19"))
    lines = text.splitlines()
    control_row = next(line for line in lines if line.startswith("Control") and "0.5000" not in line)
    assert control_row.split()[1:] == ["2", "1", "1"]
    assert "Overall accuracy: 0.6000" in text and "Macro one-vs-rest ROC AUC" in text
    json.dumps(to_jsonable(report), allow_nan=False)


def test_aggregate_averages_per_group_in_first_seen_order():
    probs = np.array([[.9, .05, .05], [.1, .8, .1], [.5, .25, .25], [.2, .2, .6]])
    means, labels, keys = aggregate_probabilities(probs, [1, 0, 0, 2], ["b", "a", "a", "c"])
    assert keys == ["b", "a", "c"]
    np.testing.assert_allclose(means[1], [.3, .525, .175])
    np.testing.assert_array_equal(labels, [1, 0, 2])


def test_aggregate_rejects_mixed_classes_in_a_group():
    with pytest.raises(ValueError, match="'a'"):
        aggregate_probabilities(np.full((2, 3), 1 / 3), [0, 1], ["a", "a"])


@pytest.mark.parametrize("call, message", [
    (lambda: confusion_matrix([0, 3], [0, 1], num_classes=3), "outside"),
    (lambda: confusion_matrix([0, 1], [0], num_classes=3), "entries"),
    (lambda: roc_auc([1, 1], [0.2, 0.3]), "positive and one negative"),
    (lambda: classification_report([0], np.array([[np.nan, 1, 0]])), "NaN"),
])
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
