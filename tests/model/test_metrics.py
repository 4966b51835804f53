from __future__ import annotations

import numpy as np
import pytest
import torch

from dedn.errors import DednInputError
from dedn.metrics import gzsl_metrics, per_class_accuracy, zsl_accuracy

SEEN, UNSEEN = [0, 1], [2, 3]
# Seen class 0: 2 of 3 right; seen class 1: 1 of 1; unseen class 2: 1 of 2; unseen class 3: 0 of 1.
TARGET = np.array([0, 0, 0, 1, 2, 2, 3])
PRED = np.array([0, 1, 0, 1, 2, 0, 1])


def test_gzsl_hand_worked() -> None:
    # S = (2/3 + 1) / 2 = 0.833333; U = (1/2 + 0) / 2 = 0.25; H = 2 S U / (S + U) = 0.384615
    m = gzsl_metrics(PRED, TARGET, SEEN, UNSEEN)
    assert m["S"] == pytest.approx(5 / 6)
    assert m["U"] == pytest.approx(0.25)
    assert m["H"] == pytest.approx(0.384615, abs=1e-6)
    assert set(m) == {"U", "S", "H"}


def test_torch_inputs_match_numpy() -> None:
    m = gzsl_metrics(torch.from_numpy(PRED), torch.from_numpy(TARGET), torch.tensor(SEEN), torch.tensor(UNSEEN))
    assert m == gzsl_metrics(PRED, TARGET, SEEN, UNSEEN)


def test_h_is_zero_when_both_zero() -> None:
    m = gzsl_metrics(np.array([1, 0, 3]), np.array([0, 1, 2]), SEEN, UNSEEN)
    assert m == {"U": 0.0, "S": 0.0, "H": 0.0}


def test_absent_classes_are_ignored() -> None:
    # Seen class 4 has no test image: it does not dilute S.
    assert per_class_accuracy(PRED, TARGET, [0, 1, 4]) == pytest.approx(5 / 6)
    assert per_class_accuracy(PRED, TARGET, [7]) == 0.0


def test_per_class_accuracy_against_naive_loop() -> None:
    rng = np.random.default_rng(0)
    target, pred = rng.integers(0, 9, 200), rng.integers(0, 9, 200)
    classes = [1, 3, 4, 8]
    accs = [np.mean(pred[target == c] == c) for c in classes if (target == c).any()]
    assert per_class_accuracy(pred, target, classes) == pytest.approx(float(np.mean(accs)))


def test_zsl_accuracy_argmax_over_unseen_only() -> None:
    # Image 0 (class 2): a seen class scores highest, but among unseen {2, 3} class 2 wins -> right.
    # Image 1 (class 3): class 2 beats 3 -> wrong. T = (1 + 0) / 2 = 0.5
    scores = np.array([[9.0, 0.0, 2.0, 1.0], [0.0, 0.0, 3.0, 1.0]])
    assert zsl_accuracy(scores, [2, 3], UNSEEN) == pytest.approx(0.5)
    assert zsl_accuracy(torch.from_numpy(scores), torch.tensor([2, 3]), UNSEEN) == pytest.approx(0.5)


def test_bad_inputs_refused() -> None:
    with pytest.raises(DednInputError, match="pred"):
        per_class_accuracy([0, 1], [0, 1, 2], SEEN)
    with pytest.raises(DednInputError, match="target"):
        gzsl_metrics(np.zeros(2, dtype=int), np.zeros((2, 1), dtype=int), SEEN, UNSEEN)
    with pytest.raises(DednInputError, match="pred"):
        per_class_accuracy(np.array([0.5, 1.0]), [0, 1], SEEN)
