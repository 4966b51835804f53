from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dedn.config import LossConfig
from dedn.errors import DednInputError
from dedn.evaluation import branch_outputs, score_grid
from dedn.losses import dedn_loss, pair_distance, self_calibration_loss
from dedn.metrics import gzsl_metrics, zsl_accuracy
from dedn.model import DEDN, Branches, ModelConfig, mix_scores

from .naive import NaiveDEDN, naive_total

B, C, H, W, G, K = 4, 8, 3, 3, 5, 5
R = H * W
SEEN = torch.tensor([True, True, True, False, False])
UNSEEN = ~SEEN
TARGET = torch.tensor([0, 2, 1, 2])

PARTITIONS = {
    "manual-like": [0, 0, 1, 1, 0, 2, 2, 3, 0, 1, 3, 2],
    "uneven": [1, 0, 0, 2, 0, 0, 0, 0, 2, 0, 2, 0],  # sizes 8, 1, 3
    "single": [0] * 12,
    "singletons": [7, 3, 0, 11, 5, 1, 9, 2, 10, 4, 8, 6],
}
ABLATIONS: dict[str, dict[str, Any]] = {
    "full": {},
    "cexp-only": {"use_fexp": False},
    "fexp-only": {"use_cexp": False},
    "no-channel-attention": {"channel_attention": False},
    "low-rank": {"low_rank_hidden": 3},
    "raw-features": {"normalize_features": False},
}


def make_model(partition: list[int], seed: int = 0, randomize: bool = True, **switches: Any) -> DEDN:
    """A tiny DEDN; ``randomize`` also fills W2/W4 (zero at init) so every path carries signal."""
    torch.manual_seed(seed)
    d = len(partition)
    model = DEDN(ModelConfig(partition=tuple(partition), **switches), torch.randn(d, G), torch.rand(K, d), C, R)
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.5)
    return model


def features(seed: int = 1, n: int = B) -> torch.Tensor:
    return torch.randn(n, C, H, W, generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor | None, b: torch.Tensor | None) -> None:
    assert (a is None) == (b is None)
    if a is not None and b is not None:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def assert_grads_match(model: DEDN, naive: NaiveDEDN) -> None:
    cfg = model.cfg

    def check(expert: Any, i: int, rows: np.ndarray, dan: Any) -> None:
        close(expert.v.grad[torch.from_numpy(rows)], dan.v.grad)
        if cfg.low_rank_hidden:  # naive holds W1 = W1a W1b: chain rule back to the factors
            close(expert.w1a.grad[i], dan.w1.grad @ expert.w1b[i].detach().T)
            close(expert.w1b.grad[i], expert.w1a[i].detach().T @ dan.w1.grad)
        else:
            close(expert.w1.grad[i], dan.w1.grad)
        close(expert.w2.grad[i], dan.w2.grad)
        if cfg.channel_attention:
            close(expert.w3.grad[i], dan.w3.grad)
            close(expert.w4.grad[i], dan.w4.grad)

    if model.cexp is not None:
        check(model.cexp, 0, np.arange(cfg.num_attributes), naive.cexp)
    if model.fexp is not None:
        assert naive.fexp is not None
        for q, (rows, dan) in enumerate(zip(naive.groups, naive.fexp, strict=True)):
            check(model.fexp, q, rows, dan)


def run_both(model: DEDN, loss_cfg: LossConfig) -> None:
    naive = NaiveDEDN(model)
    x = features()
    b = model(x)
    n = naive(x)
    for name in Branches._fields:
        close(getattr(b, name), n[name])
    for lambda_rc in (None, 0.7):
        p_ec, p_ef = model.scores(b, lambda_rc)
        np_ = naive.scores(n, lambda_rc)
        close(p_ec, np_["cexp"])
        close(p_ef, np_["fexp"])
    p_ec, p_ef = model.scores(b)
    total, _ = dedn_loss(b, p_ec, p_ef, TARGET, SEEN, UNSEEN, loss_cfg)
    ref = naive_total(n, naive.scores(n), TARGET, SEEN, UNSEEN, **loss_cfg.model_dump())
    close(total, ref)
    total.backward()
    ref.backward()
    assert_grads_match(model, naive)


@pytest.mark.parametrize("ablation", list(ABLATIONS))
@pytest.mark.parametrize("partition", list(PARTITIONS))
def test_fused_equals_naive_outputs_and_gradients(partition: str, ablation: str) -> None:
    model = make_model(PARTITIONS[partition], **ABLATIONS[ablation])
    run_both(model, LossConfig(lambda_cal=0.2))


LOSS_CONFIGS = {
    "paper": LossConfig(),
    "released": LossConfig(fidelity="released", mal_variant="released", lambda_cal=0.11, calibration=0.7),
    "no-mal": LossConfig(mal=False, beta=0.5, gamma=0.3),
    "no-distill-no-align": LossConfig(beta=0.0, gamma=0.0, eps=2.0),
    "sum": LossConfig(distance="sum", gamma=0.3, beta=0.2),
    "released-mse": LossConfig(fidelity="released", distance="mse", calibration=0.4),
}


@pytest.mark.parametrize("loss", list(LOSS_CONFIGS))
def test_fused_equals_naive_for_each_loss_config(loss: str) -> None:
    run_both(make_model(PARTITIONS["uneven"], seed=3), LOSS_CONFIGS[loss])


def test_three_dim_features_equal_four_dim() -> None:
    model = make_model(PARTITIONS["manual-like"])
    x = features()
    for a, b in zip(model(x), model(x.flatten(2)), strict=True):
        close(a, b)


# ---- ablation switches change exactly what they should ----


def param_names(model: DEDN) -> set[str]:
    return {n for n, _ in model.named_parameters()}


def test_init_follows_released_code() -> None:
    model = make_model(PARTITIONS["uneven"], randomize=False)
    for e in model.experts:
        assert torch.count_nonzero(e.w2) == 0 and torch.count_nonzero(e.w4) == 0  # attention starts uniform
        assert e.w1.std() > 0.5 and e.w3.std() > 0.5  # N(0, 1)
        torch.testing.assert_close(e.v.norm(dim=1), torch.ones(12))
    assert model.cexp is not None and model.fexp is not None
    assert model.cexp.v is not model.fexp.v and torch.equal(model.cexp.v, model.fexp.v)  # own copies
    torch.testing.assert_close(model.class_attributes.norm(dim=1), torch.ones(K))
    assert "class_attributes" not in param_names(model)
    q = 3
    assert model.fexp.w1.shape == (q, G, C) and model.fexp.w3.shape == (q, G, R)
    assert model.cexp.w1.shape == (1, G, C)


def test_cexp_only_has_no_fexp() -> None:
    model = make_model(PARTITIONS["manual-like"], use_fexp=False)
    assert model.fexp is None and not any(n.startswith("fexp") for n in param_names(model))
    b = model(features())
    assert b.fexp_r is None and b.fexp_c is None and b.cexp_r is not None
    p_ec, p_ef = model.scores(b)
    assert p_ef is None and p_ec is not None
    _, parts = dedn_loss(b, p_ec, p_ef, TARGET, SEEN, UNSEEN, LossConfig())
    assert set(parts) == {"mal_ec", "align_ec", "total"}


def test_fexp_only_has_no_cexp() -> None:
    model = make_model(PARTITIONS["manual-like"], use_cexp=False)
    assert model.cexp is None and not any(n.startswith("cexp") for n in param_names(model))
    b = model(features())
    p_ec, p_ef = model.scores(b)
    assert p_ec is None and b.cexp_r is None and p_ef is not None
    _, parts = dedn_loss(b, p_ec, p_ef, TARGET, SEEN, UNSEEN, LossConfig())
    assert set(parts) == {"mal_ef", "align_ef", "total"}


def test_without_channel_attention() -> None:
    model = make_model(PARTITIONS["manual-like"], channel_attention=False)
    assert not any(n.endswith(("w3", "w4")) for n in param_names(model))
    b = model(features())
    assert b.cexp_c is None and b.fexp_c is None
    assert b.cexp_r is not None and b.fexp_r is not None
    for lambda_rc in (None, 0.3):  # O = O_r whatever lambda_rc
        p_ec, p_ef = model.scores(b, lambda_rc)
        close(p_ec, b.cexp_r @ model.class_attributes.T)
        close(p_ef, b.fexp_r @ model.class_attributes.T)
    _, parts = dedn_loss(b, *model.scores(b), TARGET, SEEN, UNSEEN, LossConfig())
    assert not any(k.startswith("align") for k in parts)


def test_parameter_counts() -> None:
    d, q, h = 12, 4, 3
    dan = G * C * 2 + G * R * 2  # W1..W4 of one DAN
    full = make_model(PARTITIONS["manual-like"])
    assert sum(p.numel() for p in full.parameters()) == 2 * d * G + (1 + q) * dan
    low = make_model(PARTITIONS["manual-like"], low_rank_hidden=h)
    assert sum(p.numel() for p in low.parameters()) == 2 * d * G + (1 + q) * (dan - G * C + G * h + h * C)
    assert "cexp.w1" not in param_names(low) and {"cexp.w1a", "cexp.w1b"} <= param_names(low)


def test_training_and_inference_mixing_of_branches() -> None:
    model = make_model(PARTITIONS["manual-like"])
    b = model(features())
    assert b.cexp_r is not None and b.cexp_c is not None
    a = model.class_attributes
    close(model.scores(b)[0], (b.cexp_r + b.cexp_c) @ a.T)
    close(model.scores(b, 0.8)[0], (0.8 * b.cexp_r + 0.2 * b.cexp_c) @ a.T)


def loss_parts(loss: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor], Branches, Any]:
    model = make_model(PARTITIONS["manual-like"])
    b = model(features())
    p = model.scores(b)
    total, parts = dedn_loss(b, *p, TARGET, SEEN, UNSEEN, loss)
    return total, parts, b, p


def test_loss_parts_sum_to_total() -> None:
    total, parts, _, _ = loss_parts(LossConfig(lambda_cal=0.5))
    assert set(parts) == {"mal_ec", "mal_ef", "align_ec", "align_ef", "distill", "cal", "total"}
    expected = (
        parts["mal_ec"]
        + parts["mal_ef"]
        + 0.001 * (parts["align_ec"] + parts["align_ef"])
        + 0.1 * parts["distill"]
        + 0.5 * parts["cal"]
    )
    close(total.detach(), expected)
    assert total.requires_grad and not parts["total"].requires_grad


def test_without_distillation_leaves_the_term_out() -> None:
    with_d, parts, _, _ = loss_parts(LossConfig())
    without, parts0, _, _ = loss_parts(LossConfig(gamma=0.0))
    assert "distill" not in parts0
    close(without, with_d - 0.1 * parts["distill"])


def test_without_mal_is_plain_cross_entropy() -> None:
    _, parts, _, (p_ec, p_ef) = loss_parts(LossConfig(mal=False))
    assert "mal_ec" not in parts
    close(parts["ce_ec"], F.cross_entropy(p_ec.detach(), TARGET))
    close(parts["ce_ef"], F.cross_entropy(p_ef.detach(), TARGET))


def test_released_fidelity_uses_cubic_term_and_calibrated_distillation() -> None:
    _, parts, b, (p_ec, p_ef) = loss_parts(LossConfig(fidelity="released", calibration=0.5))
    assert b.cexp_r is not None and b.cexp_c is not None
    close(parts["align_ec"], pair_distance(b.cexp_r, b.cexp_c, "released").detach())
    assert not torch.allclose(parts["align_ec"], pair_distance(b.cexp_r, b.cexp_c, "mse"))
    s = 0.5 * (UNSEEN.float() * 2 - 1)
    close(parts["distill"], pair_distance(p_ec + s, p_ef + s, "released").detach())


def test_lambda_cal_adds_exactly_lambda_times_cal() -> None:
    base, parts0, _, (p_ec, p_ef) = loss_parts(LossConfig())
    with_cal, parts, _, _ = loss_parts(LossConfig(lambda_cal=0.3, calibration=0.7))
    assert "cal" not in parts0
    expected_cal = self_calibration_loss(p_ec, UNSEEN, 0.7) + self_calibration_loss(p_ef, UNSEEN, 0.7)
    close(parts["cal"], expected_cal.detach())
    close(with_cal, base + 0.3 * parts["cal"])


def test_mal_variant_is_separate_from_fidelity() -> None:
    _, paper, _, _ = loss_parts(LossConfig())
    _, mixed, _, _ = loss_parts(LossConfig(mal_variant="released"))
    close(paper["align_ec"], mixed["align_ec"])
    assert mixed["mal_ec"] < paper["mal_ec"]  # z_y = P_y - eps instead of - 2 eps


def test_mix_scores_hand_worked() -> None:
    # 0.25 [1, 2, 3] + 0.75 [3, 0, 1] = [2.5, 0.5, 1.5]; + 0.5 s with s = [-1, -1, +1] -> [2, 0, 2]
    p_ec, p_ef = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 0.0, 1.0]])
    unseen = torch.tensor([False, False, True])
    close(mix_scores(p_ec, p_ef, 0.25, 0.5, unseen), torch.tensor([[2.0, 0.0, 2.0]]))
    close(mix_scores(p_ec, None, 0.25, 0.5, unseen), torch.tensor([[0.5, 1.5, 3.5]]))  # one expert alone
    close(mix_scores(None, p_ef, 0.25, 0.0, unseen), p_ef)
    with pytest.raises(DednInputError):
        mix_scores(None, None, 0.5, 1.0, unseen)


# ---- the fused forward: no loop over clusters ----


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def test_forward_op_count_does_not_depend_on_cluster_count() -> None:
    counts = []
    for partition in ([0] * 6 + [1] * 6, PARTITIONS["singletons"]):
        model = make_model(partition)
        with OpCounter() as counter:
            model(features())
        counts.append(counter.ops)
    assert counts[0] == counts[1]
    assert counts[0]["aten.bmm.default"] == 4  # one per fExp weight W1..W4
    # Four GEMMs against the features (scores and attention of each branch) plus cExp's four V W products.
    assert sum(v for k, v in counts[0].items() if "mm" in k) == 4 + 4 + 4


# ---- determinism and refusals ----


def test_same_seed_gives_identical_parameters() -> None:
    a = make_model(PARTITIONS["uneven"], seed=5, randomize=False)
    b = make_model(PARTITIONS["uneven"], seed=5, randomize=False)
    c = make_model(PARTITIONS["uneven"], seed=6, randomize=False)
    assert list(a.state_dict()) == list(b.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.state_dict()["cexp.w1"], c.state_dict()["cexp.w1"])


def test_generator_gives_identical_parameters() -> None:
    cfg = ModelConfig(partition=(0, 1, 1, 0))
    v, a = torch.randn(4, G), torch.rand(K, 4)
    m1 = DEDN(cfg, v, a, C, R, generator=torch.Generator().manual_seed(9))
    torch.randn(10)  # the global RNG does not matter with a generator
    m2 = DEDN(cfg, v, a, C, R, generator=torch.Generator().manual_seed(9))
    assert all(torch.equal(x, y) for x, y in zip(m1.parameters(), m2.parameters(), strict=True))


@pytest.mark.parametrize(
    ("partition", "rule"),
    [
        ((0, 0, 2), "cluster 1 is empty"),
        ((0, -1, 1), "attribute 1 has no cluster"),
        ((), "got none"),
        ((0.0, 1.0), "integer"),
    ],
)
def test_bad_partitions_refused(partition: tuple[Any, ...], rule: str) -> None:
    with pytest.raises(DednInputError, match=rule):
        ModelConfig(partition=partition)


def test_bad_configs_and_shapes_refused() -> None:
    with pytest.raises(DednInputError, match="at least one expert"):
        ModelConfig(partition=(0, 1), use_cexp=False, use_fexp=False)
    with pytest.raises(DednInputError, match="low_rank_hidden"):
        ModelConfig(partition=(0, 1), low_rank_hidden=0)
    with pytest.raises(DednInputError, match="fidelity"):
        LossConfig(fidelity="other")  # type: ignore[arg-type]
    with pytest.raises(DednInputError, match="beta"):
        LossConfig(beta=-1.0)
    cfg = ModelConfig(partition=(0, 1, 1))
    with pytest.raises(DednInputError, match="attribute_vectors"):
        DEDN(cfg, torch.randn(4, G), torch.rand(K, 3), C, R)
    with pytest.raises(DednInputError, match="class_attributes"):
        DEDN(cfg, torch.randn(3, G), torch.rand(K, 4), C, R)
    model = DEDN(cfg, torch.randn(3, G), torch.rand(K, 3), C, R)
    with pytest.raises(DednInputError, match="features"):
        model(torch.randn(2, C, 4, 4))
    with pytest.raises(DednInputError, match="features"):
        model(torch.randn(2, C + 1, R))


# ---- cached inference ----


def test_branch_outputs_batches_and_casts_float16() -> None:
    model = make_model(PARTITIONS["manual-like"])
    x = features(n=7).numpy().astype(np.float16)
    cached = branch_outputs(model, x, batch_size=3)
    full = model(torch.from_numpy(x.astype(np.float32)))
    for a, b in zip(cached, full, strict=True):
        close(a, b.detach() if b is not None else None)
    assert not cached.cexp_r.requires_grad  # type: ignore[union-attr]


@pytest.mark.parametrize("ablation", ["full", "cexp-only", "no-channel-attention"])
def test_score_grid_equals_full_forward(ablation: str) -> None:
    model = make_model(PARTITIONS["manual-like"], **ABLATIONS[ablation])
    n = 12
    x = features(seed=2, n=n)
    targets = np.array([0, 1, 2, 3, 4] * 2 + [3, 4])
    seen_classes, unseen_classes = [0, 1, 2], [3, 4]
    cached = branch_outputs(model, x, batch_size=5)
    grid = score_grid(
        cached, model.class_attributes, UNSEEN, [0.2, 0.8], [0.0, 0.6], [-1.0, 0.0, 0.4, 2.0], targets,
        seen_classes, unseen_classes,
    )  # fmt: skip
    assert len(grid) == 2 * 2 * 4
    assert [(g["lambda_rc"], g["lambda_e"], g["c"]) for g in grid[:5]] == [
        (0.2, 0.0, -1.0), (0.2, 0.0, 0.0), (0.2, 0.0, 0.4), (0.2, 0.0, 2.0), (0.2, 0.6, -1.0),
    ]  # fmt: skip
    with torch.no_grad():
        b = model(x)
    for point in grid:
        p_ec, p_ef = model.scores(b, point["lambda_rc"])
        scores = mix_scores(p_ec, p_ef, point["lambda_e"], point["c"], UNSEEN)
        expected = gzsl_metrics(scores.argmax(1), targets, seen_classes, unseen_classes)
        for key in ("U", "S", "H"):
            assert point[key] == pytest.approx(expected[key]), point
        assert point["T"] == pytest.approx(zsl_accuracy(scores, targets, unseen_classes))
    # The grid is not degenerate: c moves predictions.
    assert len({(g["U"], g["S"]) for g in grid}) > 1


def test_score_grid_ties_go_to_the_lower_class_like_argmax() -> None:
    # One image, scores equal on a seen and an unseen class once c = 0.
    o = torch.tensor([[1.0, 0.0]])
    branches = Branches(o, None, None, None)
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # classes 0 and 1 tie
    unseen = torch.tensor([True, False, False])
    grid = score_grid(branches, a, unseen, [1.0], [1.0], [0.0], np.array([0]), [1, 2], [0])
    assert grid[0]["U"] == 1.0  # argmax picks class 0
