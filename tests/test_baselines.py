"""ESZSL against its defining equations and a hand-sized example."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dedn.baselines import eszsl_fit, eszsl_protocol, pool
from dedn.data import open_store


def test_closed_form_solves_the_normal_equations() -> None:
    rng = np.random.default_rng(0)
    x, s = rng.standard_normal((30, 6)), rng.standard_normal((4, 5))
    labels = rng.integers(0, 4, 30)
    gamma, lam = 0.3, 0.7
    w = eszsl_fit(x, labels, s, gamma, lam)
    y = -np.ones((30, 4))
    y[np.arange(30), labels] = 1
    # Stationary point of ||X W S^T - Y||^2 + gamma ||W S^T||^2 + lam ||X W||^2 + gamma lam ||W||^2:
    # (X^T X + gamma I) W (S^T S + lam I) = X^T Y S
    lhs = (x.T @ x + gamma * np.eye(6)) @ w @ (s.T @ s + lam * np.eye(5))
    np.testing.assert_allclose(lhs, x.T @ y @ s, rtol=1e-9, atol=1e-9)
    # and it is the minimiser of that objective: the vectorised least-squares solution agrees
    a = np.kron(s.T @ s + lam * np.eye(5), x.T @ x + gamma * np.eye(6))  # vec(A W B) = (B^T kron A) vec(W)
    w_ref = np.linalg.solve(a, (x.T @ y @ s).reshape(-1, order="F")).reshape(6, 5, order="F")
    np.testing.assert_allclose(w, w_ref, rtol=1e-9, atol=1e-9)


def test_hand_sized_example_recovers_an_unseen_class() -> None:
    # Seen classes [1,0,0] and [0,1,1]; their images' features equal their attributes. An image
    # showing only feature 2 matches the unseen class [0,1,0] better than seen class [1,0,0].
    s = np.array([[1.0, 0, 0], [0, 1, 1]])
    x = np.array([[1.0, 0, 0], [1, 0, 0], [0, 1, 1], [0, 1, 1]])
    w = eszsl_fit(x, np.array([0, 0, 1, 1]), s, 1e-3, 1e-3)
    att = np.array([[1.0, 0, 0], [0, 1, 1], [0, 1, 0]])  # third class unseen
    scores = np.array([[0.0, 1, 0]]) @ w @ att.T
    assert scores[0, 2] > scores[0, 0]


def test_pool_is_the_region_mean() -> None:
    f = np.arange(2 * 3 * 2 * 2, dtype=np.float16).reshape(2, 3, 2, 2)
    np.testing.assert_allclose(pool(f, batch=1), f.astype(np.float64).mean((2, 3)))


def test_eszsl_beats_chance_on_the_tiny_store(tiny_store: Path) -> None:
    r = eszsl_protocol(open_store(tiny_store))
    assert r.val["H"] > 0.3 and r.test["T"] > 0.5  # 5 unseen classes: chance T = 0.2
    assert {"U", "S", "H", "T"} <= set(r.test)
