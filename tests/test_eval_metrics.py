"""Metrics against scikit-learn and brute-force references on seeded random data."""

import numpy as np
import pytest
import torch
from sklearn.metrics import auc, average_precision_score, f1_score, roc_auc_score

from anomalygen.evaluation.metrics import au_pro, detection_metrics, f1_max, image_scores, localization_metrics


def test_detection_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.3
    scores = np.round(labels * 0.5 + rng.random(300), 2)  # with ties
    result = detection_metrics(labels, scores)
    assert result["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert result["ap"] == pytest.approx(average_precision_score(labels, scores))
    brute = max(f1_score(labels, scores >= t) for t in np.unique(scores))
    assert result["f1_max"] == pytest.approx(brute)


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
