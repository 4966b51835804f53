"""``dedn data extract`` on a Ray cluster with Ray Data: images decoded and prepared by CPU tasks, the ResNet-101
trunk on a pool of actors (a GPU, or a fraction of one, each where the cluster has GPUs; CPU otherwise), the features
streamed back in order and written shard by shard (``dedn.data.extract``). Memory stays bounded: Ray Data holds a few
blocks in flight, the driver one shard. ``map_images`` is the pipeline, also that of ``dedn predict --images``."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Generator
from contextlib import closing
from typing import Any

import numpy as np

from dedn.data.extract import ExtractPlan, write_shard
from dedn.errors import DednInputError


def _prepare(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Decode and prepare each image; one that is not taken gives zeros and its reason in ``error``."""
    from dedn.trunk import prepare_images

    pixels, errors = prepare_images([str(p) for p in batch["path"]], size)
    return {"row": batch["row"], "pixels": pixels, "error": np.asarray(errors, dtype=object)}


class _Trunk:
    """One actor of the pool: the trunk on this worker's GPU (when it was given one) or its CPU."""

    def __init__(self, weights: list[Any], dtype: str, threads: int) -> None:
        import ray
        import torch

        from dedn.trunk import build_trunk

        torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))  # the cluster's share, within this node
        self.device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
        self.trunk = build_trunk(ray.get(weights[0])).to(self.device)
        self.dtype = dtype

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        x = torch.from_numpy(np.array(batch["pixels"], dtype=np.float32)).to(self.device)  # a writable copy
        with torch.inference_mode():
            y = self.trunk(x).float().cpu().numpy()
        feats = y.reshape(y.shape[0], -1).astype(self.dtype)
        return {"row": batch["row"], "features": feats, "error": batch["error"]}


def pool_size(
    workers: int | None, gpus_per_worker: float | None, command: str = "dedn data extract"
) -> tuple[int, float]:
    """(actors, GPUs per actor) for the joined cluster: by default one actor per GPU, or one on CPU without GPUs."""
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    per = (1.0 if gpus >= 1 else 0.0) if gpus_per_worker is None else gpus_per_worker
    if per > 0 and per > gpus:
        why = f"asks {per:g} GPU per worker; the cluster has {gpus:g}"
        raise DednInputError(command, "--gpus-per-worker", why)
    n = workers or (max(1, int(gpus // per)) if per > 0 else 1)
    return n, per


def map_images(
    items: list[tuple[int, str]],
    size: int,
    actor: type,
    kwargs: dict[str, Any],
    *,
    workers: int,
    gpus_per_worker: float,
    batch_size: int,
) -> Generator[dict[str, np.ndarray], None, None]:
    """Ray Data over pictures: each ``(row, path)`` decoded and prepared (``size`` px) by a CPU task, then batches of
    ``row``, ``pixels``, ``error`` through a pool of ``workers`` actors ``actor(**kwargs, threads=...)`` (a GPU, or
    ``gpus_per_worker`` of one, each); their batches come back in order, a few in flight. Iterate it under
    ``contextlib.closing`` so that a stop midway ends Ray Data's execution while Ray still runs (a generator left to
    the garbage collector would have Ray Data start a Ray instance of its own)."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # batches come back in turn
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its start notices
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    rows = [{"row": r, "path": p} for r, p in items]
    ds: Any = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch_size)))
    # a whole CPU per decoding task, half one per actor: different resources keep Ray Data from fusing the two stages
    ds = ds.map_batches(_prepare, fn_kwargs={"size": size}, batch_size=batch_size, num_cpus=1)
    with warnings.catch_warnings():  # max_restarts reaches the actors only as an extra (deprecated) remote argument
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ds.map_batches(
            actor,
            fn_constructor_kwargs={**kwargs, "threads": int(max(1, cpus // workers))},
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_gpus=gpus_per_worker or None,
            num_cpus=0.5,
            # a lost actor ends the run (the command is run again, or resumed): restarting one whose weights are an
            # object-store argument is what Ray warns against (ray-project/ray#53727)
            max_restarts=0,
        )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)


def extract_shards(
    plan: ExtractPlan,
    shards: list[int],
    *,
    workers: int,
    gpus_per_worker: float,
    batch_size: int,
    tick: Callable[[int], object] = lambda n: None,
) -> None:
    """Extract the images of ``shards`` and write each shard once all its images are back. ``tick(n)`` after every
    batch. A bad image stops the extraction with one DednInputError naming it; written shards stay for --resume."""
    import ray

    todo = [r for i in shards for r in plan.shard_range(i)]
    if not todo:
        return
    kwargs = {"weights": [ray.put(_weights(plan))], "dtype": plan.dtype}
    items = [(r, str(plan.files[r])) for r in todo]
    batches = map_images(
        items, plan.size, _Trunk, kwargs, workers=workers, gpus_per_worker=gpus_per_worker, batch_size=batch_size
    )
    pending: dict[int, dict[int, np.ndarray]] = {}
    with closing(batches):
        for batch in batches:
            for r, err in zip(batch["row"], batch["error"], strict=True):
                if err:
                    raise DednInputError(plan.files[int(r)], "image", str(err))
            for r, f in zip(batch["row"], batch["features"], strict=True):
                i = int(r) // plan.shard_rows
                got = pending.setdefault(i, {})
                got[int(r)] = f
                rows = plan.shard_range(i)
                if len(got) == len(rows):
                    write_shard(plan.work, i, np.stack([got[k] for k in rows]), plan.dtype)
                    del pending[i]
            tick(len(batch["row"]))


def _weights(plan: ExtractPlan) -> dict[str, Any]:
    from dedn.trunk import load_trunk_weights, sha256_file

    if sha256_file(plan.weights) != plan.weights_sha256:
        raise DednInputError(plan.weights, "weights", "changed since the extraction was planned")
    return load_trunk_weights(plan.weights)


__all__ = ["extract_shards", "map_images", "pool_size"]
