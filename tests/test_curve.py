"""The exact seen/unseen curve and AUSUC against a hand-worked example and a brute-force sweep of the calibration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dedn.errors import DednInputError
from dedn.metrics import ausuc, best_under, gzsl_metrics, seen_unseen_curve

SEEN, UNSEEN = np.array([0, 1]), np.array([2])


def _predict(scores: np.ndarray, c: float, unseen: np.ndarray) -> np.ndarray:
    """Calibrated stacking as the model applies it: +c on unseen scores, -c on the others, argmax."""
    sign = -np.ones(scores.shape[1])
    sign[unseen] = 1.0
    return np.argmax(scores + c * sign, axis=1)


def test_a_hand_worked_example_of_four_images() -> None:
    """Best seen minus best unseen, halved, is where each image turns unseen: 3/16, 1/8, 1/8, 3/8 (scores in
    eighths: exact in binary). All seen: S = mean(1/1, 0/1) = 0.5, U = 0. After 1/8: image 2 right as unseen,
    U = 1/2 (image 1 was wrong and stays wrong). After 3/16: image 0 leaves its right seen class, S = 0. After 3/8:
    image 3 right, U = 1. Shifts: 1/8 - 1, then midpoints 5/32 and 9/32, then 3/8 + 1. AUSUC = 0.5 x 0.5."""
    scores = np.array([[0.875, 0.125, 0.5], [0.625, 0.125, 0.375], [0.375, 0.25, 0.125], [0.75, 0.125, 0.0]])
    target = np.array([0, 1, 2, 2])
    c = seen_unseen_curve(scores, target, SEEN, UNSEEN)
    np.testing.assert_allclose(c["U"], [0.0, 0.5, 0.5, 1.0], atol=1e-12)
    np.testing.assert_allclose(c["S"], [0.5, 0.5, 0.0, 0.0], atol=1e-12)
    np.testing.assert_array_equal(c["shift"], [-0.875, 0.15625, 0.28125, 1.375])
    assert ausuc(scores, target, SEEN, UNSEEN) == pytest.approx(0.25)
    assert ausuc(torch.tensor(scores), torch.tensor(target), SEEN, UNSEEN) == pytest.approx(0.25)
    assert best_under(c, "U", 0.5) == (0.5, 1)  # the most U with S >= 0.5
    assert best_under(c, "S", 0.5) == (0.5, 1)  # the most S with U >= 0.5
    assert best_under(c, "S", 0.75) == (0.0, 3)  # only the last point has U >= 0.75
    assert best_under(c, "U", 0.6) == (0.0, -1)  # S never reaches 0.6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_curve_is_what_a_fine_sweep_of_the_calibration_gives(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k = 300, 9
    unseen = np.array([6, 7, 8])
    seen = np.arange(6)
    target = rng.integers(0, k, n)
    scores = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[target]  # informative, with mistakes
    scores = np.round(scores, 2)  # ties between images' breakpoints
    curve = seen_unseen_curve(scores, target, seen, unseen)
    assert np.all(np.diff(curve["U"]) >= -1e-12) and np.all(np.diff(curve["S"]) <= 1e-12)
    assert curve["U"][0] == 0.0 and curve["S"][-1] == pytest.approx(0.0, abs=1e-12)
    # each point's own shift predicts exactly that point
    for j, c in enumerate(curve["shift"]):
        m = gzsl_metrics(_predict(scores, c, unseen), target, seen, unseen)
        assert (m["U"], m["S"]) == pytest.approx((curve["U"][j], curve["S"][j]), abs=1e-12), j
    # every calibration of a fine grid lands on a point of the curve
    grid = np.linspace(curve["shift"][0] - 1, curve["shift"][-1] + 1, 4001)
    points = {(round(u, 9), round(s, 9)) for u, s in zip(curve["U"], curve["S"], strict=True)}
    swept = []
    for c in grid:
        m = gzsl_metrics(_predict(scores, c, unseen), target, seen, unseen)
        swept.append((m["U"], m["S"]))
        assert (round(m["U"], 9), round(m["S"], 9)) in points, c
    # the area from the sweep's points (a subset of the curve's) is the exact area to the grid's resolution
    u, s = np.array(swept).T
    brute = float(np.sum(np.diff(u) * (s[1:] + s[:-1]) / 2))
    assert ausuc(scores, target, seen, unseen) == pytest.approx(brute, abs=2e-3)


def test_a_curve_needs_both_kinds_of_class() -> None:
    with pytest.raises(DednInputError):
        seen_unseen_curve(np.zeros((2, 3)), np.array([0, 1]), np.array([0, 1, 2]), np.array([], dtype=int))
