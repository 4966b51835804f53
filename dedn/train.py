"""Training and honest GZSL evaluation: one explicit function per phase, config and store in, metrics out.

Protocol (Xian et al. 2017; see README "Honest evaluation"):

1. ``validation`` task: train on ``train`` images (seen classes minus the validation-unseen ones), score
   ``val_seen`` + ``val_unseen`` each epoch among the seen classes (validation-unseen act as unseen),
   keep the epoch with the best validation H.
2. ``test`` task: retrain on all ``trainval`` images for the chosen number of epochs and evaluate
   ``test_seen`` + ``test_unseen`` once, among all classes. Optionally (``paper_protocol``) the test
   split is also scored every epoch of this run, only to report what the released code's protocol
   (best H and best T over epochs, each picked on test) would have printed, labelled as such.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch

from dedn.clusters import kmeans_partition, partition_from_groups, validate_partition
from dedn.config import TrainConfig, dump_config
from dedn.data.splits import SPLITS
from dedn.data.store import FeatureStore
from dedn.errors import DednInputError
from dedn.inference import branch_outputs, score_grid
from dedn.model import DEDN, Branches, LossConfig, ModelConfig, dedn_loss


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cuda`` without a GPU is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DednInputError("config", "device", "cuda was asked for but no CUDA device is available")
    return torch.device(name)


@dataclass(frozen=True)
class Task:
    """Which images train, which evaluate, and among which classes.

    ``classes`` (K',) global ids the evaluation chooses among; ``unseen`` (K',) bool within them;
    ``train_seen`` (K,) bool: classes the loss treats as seen.
    """

    name: str
    classes: np.ndarray
    unseen: np.ndarray
    train_seen: np.ndarray
    train_rows: np.ndarray
    eval_rows: np.ndarray


def make_task(store: FeatureStore, name: str) -> Task:
    seen, val_unseen = store.classes.seen, store.classes.val_unseen
    if name == "validation":
        classes = np.flatnonzero(seen)
        task = Task(
            name, classes, val_unseen[classes], seen & ~val_unseen, store.indices("train"), store.indices("val")
        )
    elif name == "test":
        task = Task(name, np.arange(seen.size), ~seen, seen.copy(), store.indices("trainval"), store.indices("test"))
    else:
        raise DednInputError("train", "task", f"must be 'validation' or 'test', got {name!r}")
    for what, rows in (("training", task.train_rows), ("evaluation", task.eval_rows)):
        if rows.size == 0:
            raise DednInputError(store.path, "split", f"the {name} task needs {what} images, the store has none")
    if not task.unseen.any():
        raise DednInputError(store.path, "val_unseen", f"the {name} task needs unseen classes, the store has none")
    return task


def resolve_partition(cfg: TrainConfig, store: FeatureStore) -> np.ndarray:
    """(D,) cluster ids from the config's ``model.clusters`` for this store."""
    m, d = cfg.model, store.meta.num_attributes
    if isinstance(m.clusters, list):
        return partition_from_groups(m.clusters, d, "model.clusters")
    if m.clusters == "kmeans":
        assert m.kmeans_q is not None
        if m.kmeans_q > d:
            raise DednInputError("config", "model.kmeans_q", f"must be <= D={d}, got {m.kmeans_q}")
        return kmeans_partition(store.attributes.vectors, m.kmeans_q, seed=cfg.seed)
    if m.clusters == "single":
        return np.zeros(d, dtype=np.int64)
    if m.clusters == "singletons":
        return np.arange(d, dtype=np.int64)
    if m.clusters not in store.attributes.presets:
        raise DednInputError(
            "config",
            "model.clusters",
            f"must be a preset of the store {sorted(store.attributes.presets)}, kmeans, single or singletons, "
            f"got {m.clusters!r}",
        )
    return validate_partition(store.attributes.presets[m.clusters][1], d, "model.clusters")


def check_compatible(cfg: TrainConfig, store: FeatureStore) -> None:
    """Refuse a store the config cannot train on, before any work."""
    for split in ("train", "val_seen", "val_unseen", "test_seen", "test_unseen"):
        if store.meta.split_counts.get(split, 0) == 0 and split != "val_seen":
            raise DednInputError(store.path, split, "this split is empty; dedn train needs it")
    resolve_partition(cfg, store)


def build_model(cfg: TrainConfig, store: FeatureStore, partition: np.ndarray, device: torch.device) -> DEDN:
    m = cfg.model
    mcfg = ModelConfig(
        partition=tuple(int(i) for i in partition),
        use_cexp=m.use_cexp,
        use_fexp=m.use_fexp,
        channel_attention=m.channel_attention,
        normalize_features=m.normalize_features,
        low_rank_hidden=m.low_rank_hidden,
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    model = DEDN(
        mcfg,
        torch.tensor(store.attributes.vectors),  # small; a copy, since arrays from Ray are read-only
        torch.tensor(store.classes.attributes),
        channels=store.meta.channels,
        regions=store.meta.height * store.meta.width,
        generator=gen,
    )
    return model.to(device)


def loss_config(cfg: TrainConfig) -> LossConfig:
    x = cfg.loss
    return LossConfig(
        mal=x.mal,
        beta=x.beta,
        gamma=x.gamma,
        eps=x.eps,
        fidelity=x.fidelity,
        distance=x.distance or ("released" if x.fidelity == "released" else "mse"),
        mal_variant=x.mal_variant,
        lambda_cal=x.lambda_cal,
        calibration=x.calibration,
    )


class FeatureSource:
    """Feature maps for batches: on CPU indexed from the store's array per batch (float32); on a GPU
    copied to the device once, in bf16 (float16 stores) or float32, then indexed there."""

    def __init__(self, features: np.ndarray, device: torch.device) -> None:
        self.device = device
        self.host = features
        self.resident: torch.Tensor | None = None
        if device.type == "cuda":
            dtype = torch.bfloat16 if features.dtype == np.float16 else torch.float32
            t = torch.empty(features.shape, dtype=dtype, device=device)
            step = max(1, (256 << 20) // max(1, features[0].nbytes))
            for s in range(0, len(features), step):  # copy in slices: no full host-side float32 copy
                t[s : s + step] = torch.from_numpy(np.array(features[s : s + step])).to(device, dtype)
            self.resident = t

    def batch(self, rows: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Features of ``rows``: host indices, or (GPU) indices already on the device (no copy per batch)."""
        if self.resident is not None:
            return self.resident[torch.as_tensor(rows, device=self.device)]
        return torch.from_numpy(self.host[np.asarray(rows)].astype(np.float32))

    def epoch_indices(
        self, batches: list[np.ndarray], labels: torch.Tensor
    ) -> list[tuple[np.ndarray | torch.Tensor, torch.Tensor]]:
        """(rows, targets) per batch. On a GPU the epoch's row indices go to the device in one copy and the
        targets are read from ``labels`` there, so a step copies nothing from the host."""
        out: list[tuple[np.ndarray | torch.Tensor, torch.Tensor]] = []
        if self.resident is None or not batches:
            out.extend((rows, labels[torch.from_numpy(rows)]) for rows in batches)
            return out
        flat = torch.as_tensor(np.concatenate(batches), device=self.device)
        targets = labels.to(self.device)[flat]
        start = 0
        for rows in batches:
            out.append((flat[start : start + len(rows)], targets[start : start + len(rows)]))
            start += len(rows)
        return out

    def rows(self, rows: np.ndarray) -> np.ndarray | torch.Tensor:
        """A split's features for evaluation (kept on the device on a GPU)."""
        if self.resident is not None:
            return self.resident[torch.as_tensor(rows, device=self.device)].float()
        return self.host[rows]


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast for the matrix products: ``precision`` bf16, or auto on a GPU. The CPU needs native
    bf16 instructions (AVX512-BF16 or AMX), else it falls back to float32."""
    if cfg.precision == "float32":
        return False
    if device.type == "cuda":
        return True
    return cfg.precision == "bf16" and cpu_supports_bf16()


def cpu_supports_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products natively: AVX512-BF16 (Cooper Lake, Sapphire Rapids and
    later, AMD Zen 4 and later) or AMX, and oneDNN takes the bf16 path. oneDNN's own check
    (``_is_mkldnn_bf16_supported``) is only "AVX-512 core": true on Skylake/Cascade Lake too, where bf16
    GEMMs are emulated and slower than float32."""
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return bool(native and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def single_forward_loss(
    model: DEDN, lcfg: LossConfig, seen_mask: torch.Tensor, unseen_mask: torch.Tensor, bf16: bool
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The training step's forward and loss, (x, y) -> (loss, parts): GEMMs under bf16 autocast when
    ``bf16``, softmax-weighted sums, scores and losses in float32."""
    device_type = model.class_attributes.device.type

    def forward_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            branches = model(x)
        branches = Branches(*(b.float() if b is not None else None for b in branches))
        p_ec, p_ef = model.scores(branches)
        return dedn_loss(branches, p_ec, p_ef, y, seen_mask, unseen_mask, lcfg)

    return forward_loss


F = TypeVar("F", bound=Callable[..., Any])


def compiled(fn: F, enabled: bool) -> F:
    """``torch.compile(fn)`` when enabled (first steps pay the compile time), else ``fn``."""
    if not enabled:
        return fn
    return cast(F, torch.compile(fn, dynamic=False))


def epoch_batches(
    rows: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int,
    balanced: bool,
    seen_classes: np.ndarray,
) -> list[np.ndarray]:
    """Row indices of each minibatch of one epoch; a pure function of (seed, epoch), so resuming at an
    epoch replays the same stream. ``balanced``: min(#classes, B) classes, one image each (released)."""
    rng = np.random.default_rng([seed, epoch])
    n_batches = math.ceil(rows.size / batch_size)
    if not balanced:
        perm = rng.permutation(rows)
        return [perm[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]
    by_class = {int(k): rows[labels[rows] == k] for k in seen_classes}
    by_class = {k: v for k, v in by_class.items() if v.size}
    keys = np.array(sorted(by_class))
    out = []
    for _ in range(n_batches):
        chosen = rng.choice(keys, size=min(keys.size, batch_size), replace=False)
        out.append(np.array([rng.choice(by_class[int(k)]) for k in chosen]))
    return out


@dataclass
class EpochRecord:
    epoch: int
    loss: dict[str, float]
    eval: dict[str, float]  # U, S, H, T at the configured inference parameters
    grid_best: dict[str, float]  # best grid point by H: lambda_rc, lambda_e, c, U, S, H, T
    seconds: float
    samples_per_s: float


@dataclass
class TrainResult:
    task: str
    history: list[EpochRecord]
    best_epoch: int
    best: dict[str, float]
    best_grid: dict[str, float]
    best_state: dict[str, torch.Tensor] = field(repr=False)
    partition: np.ndarray = field(repr=False)


def evaluate(
    model: DEDN, source: FeatureSource, store: FeatureStore, task: Task, cfg: TrainConfig
) -> tuple[dict[str, float], dict[str, float], list[dict[str, float]]]:
    """Metrics at the configured inference point and over the whole grid, from one forward pass."""
    model.eval()
    branches = branch_outputs(model, source.rows(task.eval_rows), cfg.eval_batch_size)
    model.train()
    return evaluate_branches(branches, model.class_attributes, store, task, cfg)


def evaluate_branches(
    branches: Branches, class_attributes: torch.Tensor, store: FeatureStore, task: Task, cfg: TrainConfig
) -> tuple[dict[str, float], dict[str, float], list[dict[str, float]]]:
    """Metrics at the configured inference point, the best grid point and the whole grid, from cached
    (N, D) branch outputs of the task's evaluation images."""
    inf = cfg.inference
    a = class_attributes[torch.as_tensor(task.classes, device=class_attributes.device)]
    local = np.searchsorted(task.classes, store.labels[task.eval_rows])
    seen_l, unseen_l = np.flatnonzero(~task.unseen), np.flatnonzero(task.unseen)
    args = (branches, a, task.unseen)
    configured = score_grid(*args, [inf.lambda_rc], [inf.lambda_e], [inf.calibration], local, seen_l, unseen_l)[0]
    grid = score_grid(*args, inf.grid_lambda_rc, inf.grid_lambda_e, inf.grid_calibration, local, seen_l, unseen_l)
    best = max(grid, key=lambda r: r["H"])
    return configured, best, grid


@dataclass
class Progress:
    """What an epoch callback sees: the live model and optimiser, the history, the best epoch so far."""

    model: DEDN
    optimizer: torch.optim.Optimizer
    history: list[EpochRecord]
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    partition: np.ndarray


EpochCallback = Callable[[EpochRecord, Progress], None]


def train(
    cfg: TrainConfig,
    store: FeatureStore,
    task_name: str = "validation",
    *,
    epochs: int | None = None,
    on_epoch: EpochCallback | None = None,
    resume: dict[str, Any] | None = None,
    keep_epoch: int | None = None,
    eval_only_at: int | None = None,
    select_on: str = "configured",
    progress: bool = False,
    batch_seed: int | None = None,
    check_each_step: bool | None = None,
) -> TrainResult:
    """Train DEDN on one task and evaluate every epoch.

    Args:
        cfg: validated config (``effective()`` is applied here).
        store: an open feature store.
        task_name: ``validation`` (train on train, evaluate val) or ``test`` (train on trainval, evaluate test).
        epochs: defaults to ``cfg.optim.epochs``.
        on_epoch: called after each epoch with the record and a Progress (tuning reports here).
        resume: ``{"epoch", "model", "optimizer", "history"[, "best_model"]}`` from a checkpoint; training
            continues at epoch + 1 with the same minibatch stream as an uninterrupted run.
        keep_epoch: report and keep the state of this epoch instead of selecting by H (the test task:
            the epoch was chosen on validation).
        eval_only_at: evaluate only at this epoch (other records carry empty metrics): a test split
            scored once.
        select_on: ``configured`` (H at the config's inference point) or ``grid`` (best grid point's H).
        batch_seed: seed of the minibatch stream; defaults to ``cfg.seed`` (which also seeds the weights).
        check_each_step: stop at the first non-finite loss (a host sync per step); None: on a CPU only,
            on a GPU the check runs once per epoch.
    Returns:
        TrainResult with per-epoch history and the state dict of the best epoch by evaluation H.
    Raises:
        DednInputError: an incompatible store or config, before training starts.
    """
    cfg = cfg.effective()
    check_compatible(cfg, store)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    task = make_task(store, task_name)
    partition = resolve_partition(cfg, store)
    model = build_model(cfg, store, partition, device)
    o = cfg.optim
    optimizer = torch.optim.RMSprop(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    lcfg = loss_config(cfg)
    source = FeatureSource(store.features(), device)
    labels = torch.as_tensor(store.labels.astype(np.int64))
    seen_mask = torch.as_tensor(task.train_seen, device=device)
    unseen_mask = ~seen_mask
    n_epochs = epochs or o.epochs
    history: list[EpochRecord] = []
    start = 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        history = [EpochRecord(**r) for r in resume.get("history", [])]
        start = int(resume["epoch"]) + 1
    best_epoch, best, best_grid, best_state = 0, {"H": -1.0}, {}, {}
    if history:  # resumed: the best so far is at most as good as the checkpoint it came from
        r = max(history, key=lambda r: (r.grid_best if select_on == "grid" else r.eval).get("H", -1.0))
        best_epoch, best, best_grid = r.epoch, r.eval, r.grid_best
        best_state = {
            k: v.detach().cpu().clone() for k, v in (resume or {}).get("best_model", model.state_dict()).items()
        }
    forward_loss = compiled(
        single_forward_loss(model, lcfg, seen_mask, unseen_mask, use_bf16(cfg, device)), cfg.compile
    )
    optimizer_step = compiled(optimizer.step, cfg.compile)  # RMSprop's foreach loop as one kernel set
    if check_each_step is None:
        check_each_step = device.type != "cuda"
    train_classes = np.flatnonzero(task.train_seen)
    for epoch in range(start, n_epochs + 1):
        t0 = time.perf_counter()
        model.train()
        batches = epoch_batches(
            task.train_rows,
            store.labels,
            o.batch_size,
            cfg.seed if batch_seed is None else batch_seed,
            epoch,
            o.balanced,
            train_classes,
        )
        sums: dict[str, torch.Tensor] = {}
        iterator: Any = source.epoch_indices(batches, labels)
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, desc=f"{task.name} epoch {epoch}/{n_epochs}", leave=False, unit="batch")
        diverged = torch.zeros((), dtype=torch.bool, device=device)
        for rows, y in iterator:
            x = source.batch(rows)
            loss, parts = forward_loss(x, y)
            if check_each_step:
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}: training diverged")
            else:  # on a GPU: no host sync per step; the flag is read at the end of the epoch
                diverged |= ~torch.isfinite(loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer_step()
            for k, v in parts.items():  # summed on the device: no host sync per step
                sums[k] = sums[k] + v * len(rows) if k in sums else v * len(rows)
        if bool(diverged):
            raise FloatingPointError(f"loss is not finite in epoch {epoch}: training diverged")
        n_seen = sum(len(b) for b in batches)
        train_s = time.perf_counter() - t0
        configured: dict[str, float] = {}
        grid_best: dict[str, float] = {}
        if eval_only_at is None or epoch == eval_only_at:
            configured, grid_best, _ = evaluate(model, source, store, task, cfg)
        record = EpochRecord(
            epoch=epoch,
            loss={k: float(v) / n_seen for k, v in sums.items()},
            eval=configured,
            grid_best=grid_best,
            seconds=time.perf_counter() - t0,
            samples_per_s=n_seen / train_s,
        )
        history.append(record)
        score = (grid_best if select_on == "grid" else configured).get("H", -1.0)
        if (score > best["H"]) if keep_epoch is None else (epoch == keep_epoch):
            best_epoch, best, best_grid = epoch, configured, grid_best
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if on_epoch is not None:
            on_epoch(record, Progress(model, optimizer, history, best_epoch, best_state, partition))
    return TrainResult(task.name, history, best_epoch, best, best_grid, best_state, partition)


@dataclass
class FitResult:
    """What ``dedn train`` reports: validation selection, honest test, and the paper-protocol figures."""

    validation: TrainResult
    test: dict[str, float] | None
    test_grid_point: dict[str, float] | None
    paper_protocol: dict[str, float] | None
    final: TrainResult | None


def fit_and_test(cfg: TrainConfig, store: FeatureStore, progress: bool = False) -> FitResult:
    """Phase 1 on the validation task; phase 2 retrains on trainval for the chosen epochs, test once."""
    val = train(cfg, store, "validation", progress=progress)
    if not cfg.final_fit:
        return FitResult(val, None, None, None, None)
    eff = cfg.effective()
    # With paper_protocol, run all epochs and score test each epoch, only for the labelled comparison;
    # the honest test figure is the one at the epoch validation chose.
    n = eff.optim.epochs if cfg.paper_protocol else val.best_epoch
    final = train(
        cfg,
        store,
        "test",
        epochs=n,
        keep_epoch=val.best_epoch,
        eval_only_at=None if cfg.paper_protocol else val.best_epoch,
        progress=progress,
    )
    # The inference grid point chosen on validation, applied once to the kept test-task model.
    g = val.best_grid
    point = cfg.model_copy(
        update={
            "inference": cfg.inference.model_copy(
                update={"lambda_rc": g["lambda_rc"], "lambda_e": g["lambda_e"], "calibration": g["c"]}
            )
        }
    )
    device = resolve_device(eff.device)
    model = build_model(eff, store, final.partition, device)
    model.load_state_dict(final.best_state)
    test_grid_point, _, _ = evaluate(
        model, FeatureSource(store.features(), device), store, make_task(store, "test"), point.effective()
    )
    paper = None
    if cfg.paper_protocol:
        by_h = max(final.history, key=lambda r: r.eval["H"])
        paper = {
            "U": by_h.eval["U"],
            "S": by_h.eval["S"],
            "H": by_h.eval["H"],
            "T": max(r.eval["T"] for r in final.history),
            "epoch_H": by_h.epoch,
        }
    return FitResult(val, final.best, test_grid_point, paper, final)


def checkpoint_header(store: FeatureStore) -> dict[str, Any]:
    """What a checkpoint records of the store it was trained on (enough to serve it without the store)."""
    return {
        "fingerprint": store.meta.fingerprint,
        "dataset": store.meta.name,
        "feature_shape": list(store.meta.feature_shape),
        "num_attributes": store.meta.num_attributes,
        "semantic_dim": store.meta.semantic_dim,
        "class_names": store.classes.names,
        "seen": store.classes.seen.tolist(),
        "attribute_names": store.attributes.names,
    }


def save_checkpoint(
    folder: str | os.PathLike[str],
    state: dict[str, torch.Tensor],
    cfg: TrainConfig,
    store: FeatureStore | dict[str, Any],
    partition: np.ndarray,
    extra: dict[str, Any],
) -> Path:
    """model.safetensors + config.yaml + checkpoint.json, written to a temporary folder then renamed.

    ``store``: the training store, or its ``checkpoint_header``."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    header = store if isinstance(store, dict) else checkpoint_header(store)
    out = Path(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        (tmp / "config.yaml").write_text(dump_config(cfg))
        meta = {
            **header,
            "partition": [int(i) for i in partition],
            "inference": cfg.inference.model_dump(),
            **extra,
        }
        (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=2, default=_jsonable) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if hasattr(x, "__dataclass_fields__"):
        return asdict(x)
    raise TypeError(type(x).__name__)


def load_checkpoint(folder: str | os.PathLike[str], device: str = "cpu") -> tuple[DEDN, TrainConfig, dict[str, Any]]:
    """Rebuild the model from a checkpoint folder (safetensors; no pickle)."""
    import yaml
    from safetensors.torch import load_file

    from dedn.config import validate_config

    p = Path(folder)
    for name in ("model.safetensors", "config.yaml", "checkpoint.json"):
        if not (p / name).is_file():
            raise DednInputError(p / name, "file", "missing from the checkpoint folder")
    cfg = validate_config(yaml.safe_load((p / "config.yaml").read_text()), str(p / "config.yaml")).effective()
    meta = json.loads((p / "checkpoint.json").read_text())
    state = load_file(str(p / "model.safetensors"), device=device)
    m = cfg.model
    c, h, w = meta["feature_shape"]
    mcfg = ModelConfig(
        partition=tuple(meta["partition"]),
        use_cexp=m.use_cexp,
        use_fexp=m.use_fexp,
        channel_attention=m.channel_attention,
        normalize_features=m.normalize_features,
        low_rank_hidden=m.low_rank_hidden,
    )
    k = len(meta["class_names"])
    model = DEDN(
        mcfg,
        torch.zeros(meta["num_attributes"], meta["semantic_dim"]) + 1.0,
        torch.ones(k, meta["num_attributes"]),
        channels=c,
        regions=h * w,
    )
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, meta


__all__ = [
    "SPLITS",
    "EpochRecord",
    "FitResult",
    "Task",
    "TrainResult",
    "build_model",
    "fit_and_test",
    "load_checkpoint",
    "make_task",
    "resolve_device",
    "resolve_partition",
    "save_checkpoint",
    "train",
]
