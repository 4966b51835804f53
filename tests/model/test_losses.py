from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dedn.errors import DednInputError
from dedn.losses import cross_entropy_loss, margin_aware_loss, pair_distance, self_calibration_loss

from .naive import naive_cal, naive_ce, naive_distance, naive_mal

SEEN = torch.tensor([True, True, False])


def test_mal_hand_worked_paper() -> None:
    # P = [1, 2, 0], y = 0, classes 0, 1 seen and 2 unseen, eps = 1:
    # z = [1 - 2, 2 + 1, 0] = [-1, 3, 0]; L = -z_y + log(e^-1 + e^3 + e^0) = 1 + log(21.4534) = 4.065884
    loss = margin_aware_loss(torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([0]), SEEN, 1.0)
    assert loss.item() == pytest.approx(4.065884, abs=1e-5)


def test_mal_hand_worked_released() -> None:
    # Released SUN/AWA2 variant: z_y = P_y - eps -> z = [0, 3, 0]; L = log(1 + e^3 + 1) = 3.094923
    loss = margin_aware_loss(torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([0]), SEEN, 1.0, variant="released")
    assert loss.item() == pytest.approx(3.094923, abs=1e-5)


def test_mal_positional_signature_and_batch_mean() -> None:
    scores = torch.tensor([[1.0, 2.0, 0.0], [1.0, 2.0, 0.0]])
    # The same row twice: the mean equals the single-row value.
    assert margin_aware_loss(scores, torch.tensor([0, 0]), SEEN, 1.0).item() == pytest.approx(4.065884, abs=1e-5)


def test_mal_zero_margin_is_cross_entropy() -> None:
    torch.manual_seed(0)
    scores, target = torch.randn(4, 5), torch.tensor([0, 1, 2, 1])
    seen = torch.tensor([True, True, True, False, False])
    torch.testing.assert_close(margin_aware_loss(scores, target, seen, 0.0), F.cross_entropy(scores, target))


@pytest.mark.parametrize("variant", ["paper", "released"])
@pytest.mark.parametrize("eps", [0.5, 1.0, 2.5])
def test_mal_against_naive(variant: str, eps: float) -> None:
    torch.manual_seed(1)
    scores, target = torch.randn(6, 5) * 3, torch.tensor([0, 1, 2, 2, 1, 0])
    seen = torch.tensor([True, True, True, False, False])
    got = margin_aware_loss(scores, target, seen, eps, variant)  # type: ignore[arg-type]
    torch.testing.assert_close(got, naive_mal(scores, target, seen, eps, variant), atol=1e-5, rtol=1e-5)


def test_cross_entropy_against_naive() -> None:
    torch.manual_seed(2)
    scores, target = torch.randn(4, 5), torch.tensor([4, 0, 3, 1])
    torch.testing.assert_close(cross_entropy_loss(scores, target), naive_ce(scores, target), atol=1e-6, rtol=1e-6)


def test_pair_distance_hand_worked_mse_and_sum() -> None:
    # x = [0, 0], y = [ln 3, 0]: p = [.5, .5], q = [.75, .25], m = [.625, .375]
    # KL(p||m) = .5 ln(.8) + .5 ln(4/3) = 0.0322693; KL(q||m) = .75 ln(1.2) + .25 ln(2/3) = 0.0353749
    # JSD = 0.0338221; ||x - y||^2 = (ln 3)^2 = 1.2069490, its mean over N = 2 elements 0.6034745
    x, y = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    assert pair_distance(x, y).item() == pytest.approx(0.6372966, abs=1e-5)  # mse is the default
    assert pair_distance(x, y, "mse").item() == pytest.approx(0.6372966, abs=1e-5)
    assert pair_distance(x, y, "sum").item() == pytest.approx(1.2407710, abs=1e-5)


def test_pair_distance_hand_worked_released_cubic() -> None:
    # y = x + 2 everywhere: the softmaxes agree (JSD 0); d = [-2, -2, -2]:
    # mse: mean d^2 = 4; sum: sum d^2 = 12; released: sum |d|^3 / ||d|| = 24 / (2 sqrt 3) = 4 sqrt 3 = 6.928203
    x = torch.tensor([[0.5, -1.0, 2.0]])
    y = x + 2.0
    assert pair_distance(x, y).item() == pytest.approx(4.0, abs=1e-5)
    assert pair_distance(x, y, "sum").item() == pytest.approx(12.0, abs=1e-5)
    assert pair_distance(x, y, "released").item() == pytest.approx(6.928203, abs=1e-5)


@pytest.mark.parametrize("distance", ["mse", "sum", "released"])
@pytest.mark.parametrize("n", [1, 7, 200])
def test_pair_distance_against_naive(distance: str, n: int) -> None:
    torch.manual_seed(3 + n)
    x, y = torch.randn(5, n) * 2, torch.randn(5, n)
    got = pair_distance(x, y, distance)  # type: ignore[arg-type]
    torch.testing.assert_close(got, naive_distance(x, y, distance), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [2, 10, 312])
def test_pair_distance_sum_is_n_times_mse_beyond_the_jsd(n: int) -> None:
    # The two readings share the JSD and differ in the squared term by exactly the vector length N.
    torch.manual_seed(n)
    x, y = torch.randn(4, n), torch.randn(4, n) + 0.5
    jsd = pair_distance(x, y, "mse") - (x - y).pow(2).mean()
    torch.testing.assert_close(pair_distance(x, y, "sum") - jsd, n * (pair_distance(x, y, "mse") - jsd))


def test_pair_distance_leading_member_dimension() -> None:
    torch.manual_seed(5)
    x, y = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    for distance in ("mse", "sum", "released"):
        got = pair_distance(x, y, distance)  # type: ignore[arg-type]
        want = torch.stack([naive_distance(x[m], y[m], distance) for m in range(3)])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_pair_distance_stable_for_large_scores() -> None:
    x, y = torch.tensor([[1000.0, 0.0]]), torch.tensor([[0.0, 1000.0]])
    # p and q are one-hot on different classes: JSD = ln 2; squared term 2e6 summed, 1e6 as a mean.
    assert pair_distance(x, y).item() == pytest.approx(1e6 + math.log(2.0), rel=1e-6)
    assert pair_distance(x, y, "sum").item() == pytest.approx(2e6 + math.log(2.0), rel=1e-6)


@pytest.mark.parametrize("distance", ["mse", "sum", "released"])
def test_pair_distance_zero_for_equal_inputs_with_finite_gradient(distance: str) -> None:
    x = torch.randn(3, 4, requires_grad=True)
    d = pair_distance(x, x.detach().clone(), distance)  # type: ignore[arg-type]
    d.backward()
    assert d.item() == pytest.approx(0.0, abs=1e-6)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_unknown_variants_refused() -> None:
    with pytest.raises(DednInputError, match="mal_variant"):
        margin_aware_loss(torch.zeros(1, 3), torch.tensor([0]), SEEN, 1.0, "other")  # type: ignore[arg-type]
    with pytest.raises(DednInputError, match="distance"):
        pair_distance(torch.zeros(1, 3), torch.zeros(1, 3), "other")  # type: ignore[arg-type]
    # The old name of the summed term is refused with the two names that replace it, not silently remapped.
    with pytest.raises(DednInputError, match="'paper' is now 'mse'.*'sum'"):
        pair_distance(torch.zeros(1, 3), torch.zeros(1, 3), "paper")  # type: ignore[arg-type]


def test_self_calibration_hand_worked() -> None:
    # c = 0, class 2 unseen. Row 1 P = [0, ln 3, 0]: unseen mass 1 / (1 + 3 + 1) = 0.2;
    # row 2 P = [0, 0, ln 2]: 2 / (1 + 1 + 2) = 0.5. Mean inside the log: -ln(0.35) = 1.049822
    scores = torch.tensor([[0.0, math.log(3.0), 0.0], [0.0, 0.0, math.log(2.0)]])
    assert self_calibration_loss(scores, ~SEEN, 0.0).item() == pytest.approx(1.049822, abs=1e-5)


def test_self_calibration_applies_c() -> None:
    # P = 0, c = ln(2) / 2: P + c s = [-c, -c, c]; mass = e^c / (2 e^-c + e^c) = 2 / (2 + 2) = 0.5 -> ln 2
    loss = self_calibration_loss(torch.zeros(1, 3), ~SEEN, math.log(2.0) / 2)
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6)


def test_self_calibration_against_naive() -> None:
    torch.manual_seed(4)
    scores = torch.randn(4, 6) * 3
    unseen = torch.tensor([False, True, False, False, True, False])
    got = self_calibration_loss(scores, unseen, 1.0)
    torch.testing.assert_close(got, naive_cal(scores, unseen, 1.0), atol=1e-5, rtol=1e-5)
