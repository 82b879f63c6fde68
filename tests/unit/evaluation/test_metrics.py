"""Metrics against hand-computed cases and direct implementations written here (not scikit-learn)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import auc

from anomalygen.evaluation.metrics import au_pro, detection_metrics, f1_max, image_scores, localization_metrics, pr_curve


def _direct_auroc(labels, scores):
    """Mann-Whitney: the share of (anomalous, normal) pairs ranked right, ties counting one half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


def _operating_points(labels, scores):
    """(precision, recall) when every score >= t is called anomalous, for each distinct t (descending)."""
    points = []
    for t in sorted(set(scores.tolist()), reverse=True):
        called = scores >= t
        tp = int((called & (labels == 1)).sum())
        points.append((tp / int(called.sum()), tp / int((labels == 1).sum())))
    return points


def _direct_ap(labels, scores):
    """AP = sum_k (R_k - R_{k-1}) P_k over the thresholds (step-wise, no interpolation)."""
    total, last_recall = 0.0, 0.0
    for precision, recall in _operating_points(labels, scores):
        total += (recall - last_recall) * precision
        last_recall = recall
    return total


def _direct_f1_max(labels, scores):
    return max(2 * p * r / (p + r) for p, r in _operating_points(labels, scores) if p + r > 0)


def test_detection_metrics_on_a_hand_computed_case():
    labels = np.array([1, 0, 1, 0, 1, 0])
    scores = np.array([0.9, 0.8, 0.5, 0.5, 0.3, 0.1])
    result = detection_metrics(labels, scores)
    # 9 (anomalous, normal) pairs: 0.9 beats all 3, 0.5 beats 0.1 and ties 0.5, 0.3 beats 0.1 -> 5.5 / 9.
    assert result["auroc"] == pytest.approx(5.5 / 9)
    # Thresholds 0.9 (P 1, R 1/3), 0.8 (P 1/2, R 1/3), 0.5 (P 1/2, R 2/3), 0.3 (P 3/5, R 1), 0.1 (P 1/2, R 1):
    # AP = 1/3 * 1 + 1/3 * 1/2 + 1/3 * 3/5 = 0.7; best F1 at 0.3: 2 * 0.6 / 1.6 = 0.75.
    assert result["ap"] == pytest.approx(0.7)
    assert result["f1_max"] == pytest.approx(0.75)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 6)), min_size=2, max_size=40))
def test_detection_metrics_match_direct_implementations(pairs):
    labels = np.array([int(label) for label, _ in pairs])
    scores = np.array([score / 6 for _, score in pairs])  # few distinct values: many ties
    if labels.min() == labels.max():
        return
    result = detection_metrics(labels, scores)
    assert result["auroc"] == pytest.approx(_direct_auroc(labels, scores))
    assert result["ap"] == pytest.approx(_direct_ap(labels, scores))
    assert result["f1_max"] == pytest.approx(_direct_f1_max(labels, scores))


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 300), st.sampled_from([3, 50, None]), st.floats(0.01, 0.99))
def test_one_sort_metrics_equal_scikit_learn(seed, n, levels, share):
    """The metrics are scikit-learn's (computed from one sort): equal to its functions to the last
    bit or within 1e-15, with ties (``levels`` distinct scores) and without."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < share).astype(np.uint8)
    labels[:2] = [0, 1]
    scores = rng.random(n).astype(np.float32)
    if levels:
        scores = np.floor(scores * levels) / levels
    result = detection_metrics(labels, scores)
    assert result["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-15, rel=0)
    assert result["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-15, rel=0)
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-300)
    assert result["f1_max"] == pytest.approx(f1.max(), abs=1e-15, rel=0)
    keep = np.unique(np.linspace(0, len(precision) - 1, min(200, len(precision))).astype(int))
    assert pr_curve(labels, scores) == {"precision": precision[keep].tolist(), "recall": recall[keep].tolist()}


def test_auroc_of_one_class_is_an_error_as_in_scikit_learn():
    with pytest.raises(ValueError, match="Only one class"):
        detection_metrics(np.ones(4), np.arange(4.0))


def test_f1_max_is_one_for_a_perfect_ranking_and_handles_ties():
    assert f1_max(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    # Every score equal: the only operating point predicts everything positive.
    assert f1_max(np.array([0, 1, 1, 0]), np.zeros(4)) == pytest.approx(2 * 0.5 / 1.5)


def _reference_pro(masks, maps, limit=0.3):
    """Brute force: PRO and FPR at every distinct threshold, then sklearn's trapezoid area."""
    from scipy import ndimage

    negatives = np.concatenate([~m.ravel() for m in masks])
    flat_maps = np.concatenate([a.ravel() for a in maps])
    image_of_region = []
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        image_of_region += [(i, labelled == k) for k in range(1, count + 1)]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(flat_maps)[::-1]:
        fprs.append(float((flat_maps[negatives] >= t).mean()))
        pros.append(float(np.mean([(maps[i][region] >= t).mean() for i, region in image_of_region])))
    fprs, pros = np.array(fprs), np.array(pros)
    inside = fprs <= limit
    x, y = list(fprs[inside]), list(pros[inside])
    if not inside.all():
        k = np.argmax(~inside)
        y.append(pros[k - 1] + (pros[k] - pros[k - 1]) * (limit - fprs[k - 1]) / (fprs[k] - fprs[k - 1]))
        x.append(limit)
    return auc(x, y) / limit


def test_au_pro_matches_brute_force_on_random_maps():
    rng = np.random.default_rng(1)
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[0, 2:6, 2:6] = True
    masks[0, 10:12, 9:15] = True
    masks[2, 4:14, 5:8] = True
    maps = np.round(rng.random((3, 16, 16)) + masks * 0.4, 2)  # rounding creates ties
    assert au_pro(list(masks), list(maps)) == pytest.approx(_reference_pro(masks, maps), abs=1e-9)


def test_au_pro_perfect_and_inverted_maps():
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[1, 2:4, 2:4] = True
    assert au_pro(list(masks), list(masks.astype(float))) == pytest.approx(1.0)
    assert au_pro(list(masks), list(1.0 - masks)) == pytest.approx(0.0)


def test_image_score_is_max_of_21x21_average_pool():
    maps = torch.zeros(2, 32, 32)
    maps[0, 16, 16] = 1.0
    maps[1, 5:26, 5:26] = 0.5
    assert image_scores(maps).tolist() == pytest.approx([1 / 441, 0.5])


def test_localization_metrics_keys_and_perfect_maps():
    masks = np.zeros((4, 8, 8), dtype=bool)
    masks[2:, 3:5, 3:5] = True
    result = localization_metrics(masks, masks.astype(float), masks.reshape(4, -1).max(1).astype(float))
    assert set(result) == {"pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_au_pro", "image_auroc", "image_ap", "image_f1_max"}
    assert all(value == pytest.approx(1.0) for value in result.values())


def test_image_metrics_are_undefined_without_anomaly_free_test_images():
    masks = np.zeros((3, 8, 8), dtype=bool)
    masks[:, 3:5, 3:5] = True  # every test image is anomalous (no test/good)
    maps = np.random.default_rng(0).random((3, 8, 8))
    result = localization_metrics(masks, maps, np.array([0.1, 0.5, 0.9]))
    assert result["image_auroc"] is None and result["image_ap"] is None and result["image_f1_max"] is None
    assert 0.0 <= result["pixel_auroc"] <= 1.0  # pixel metrics still have normal pixels to rank against
