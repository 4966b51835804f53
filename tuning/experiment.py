"""A search's options, its experiment folder ``<storage>/<name>/`` and its MLflow parent run around Ray's session."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dedn.errors import DednInputError
from tracking.sink import RunSink

__all__ = [
    "SearchOptions",
    "abandon",
    "check_experiment_name",
    "checked_tracking_uri",
    "experiment_dir",
    "experiment_path",
    "joined_or_abandoned",
    "open_tracking",
]


@dataclass(frozen=True)
class SearchOptions:
    """What a search was asked, recorded in its folder's ``search.json`` (``--resume`` needs nothing else)."""

    spec_path: str
    store: str | None = None
    name: str | None = None
    storage_path: str = "runs"
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    num_samples: int | None = None
    max_concurrent_trials: int | None = None
    time_budget_s: float | None = None
    posthoc_inference: bool = False
    address: str | None = None
    final_test: bool = True
    tracking_uri: str | None = None
    track: bool = True
    population: int | None = None
    verbose: bool = False  # Tune's own result tables instead of the one progress line
    resource_wait_s: float = 600.0  # on a joined cluster: how long to wait for a node that can hold a trial
    optuna_storage: str | None = None  # the study's storage URL (tuning.optuna_storage); None: spec's or default


def check_experiment_name(name: str, field: str = "--name") -> None:
    """Refuse a name that is not one folder name under the storage path, before anything is created."""
    rule = None
    if name.strip() == "":
        rule = "must not be empty"
    elif "/" in name or "\\" in name:
        rule = "must be a single folder name, without '/' or '\\' (it is created under --storage-path)"
    elif name in (".", ".."):
        rule = "must be a folder name, not '.' or '..'"
    elif Path(name).is_absolute() or "\0" in name:
        rule = "must be a single folder name under --storage-path, not a path"
    if rule is not None:
        raise DednInputError(name if name else "''", field, rule)


def experiment_dir(storage_path: str, name: str) -> Path:
    """The experiment folder ``<storage>/<name>``, the storage path resolved."""
    return Path(storage_path).expanduser().resolve() / name


def experiment_path(storage_path: str, name_or_path: str) -> tuple[str, str]:
    """``--resume`` accepts an experiment folder or a name under the storage path."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return str(p.resolve().parent), p.resolve().name
    if "/" in name_or_path or "\\" in name_or_path:
        why = "no such folder: give the folder of an earlier search (runs/<name>) or its name under --storage-path"
        raise DednInputError(name_or_path, "--resume", why)
    return storage_path, name_or_path


def checked_tracking_uri(opts: SearchOptions) -> str:
    """The tracking store the search logs to; refused when it cannot be reached, or is a file store on a cluster."""
    from tracking.store import check_not_scattered, check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(opts.tracking_uri)
    check_not_scattered(uri, joins_cluster=opts.address is not None)
    check_reachable(uri)
    return uri


def open_tracking(
    opts: SearchOptions, exp: Path, name: str, store: Any, base: dict[str, Any], resume: bool = False
) -> RunSink:
    """The search's MLflow parent run, created with the spec, the store's header and the base config (``dedn promote``
    rebuilds a trial's config from it), or on resume found again; if that fails, a new search's folder goes again."""
    import optuna
    import ray

    from dedn.checkpoints import checkpoint_header
    from dedn.data.extract import store_params
    from tracking.store import code_version

    assert opts.tracking_uri is not None
    sink = RunSink(opts.tracking_uri, name)
    texts = {
        "store.json": json.dumps(checkpoint_header(store), indent=2),
        "base_config.yaml": yaml.safe_dump(base, sort_keys=False),
    }
    try:
        tags = {
            "dedn.dataset": store.meta.name,
            "dedn.fingerprint": store.meta.fingerprint,
            "dedn.search_spec": str(Path(opts.spec_path).resolve()),
            "dedn.code_version": code_version(),
            "ray.version": ray.__version__,
            "optuna.version": optuna.__version__,
            "dedn.posthoc_inference": str(opts.posthoc_inference).lower(),
        }
        sink.open_parent(tags, [opts.spec_path], texts, store_params(store.meta.provenance))
    except BaseException:
        abandon(exp, sink, resume)
        raise
    return sink


@contextmanager
def joined_or_abandoned(session: Any, exp: Path, sink: Callable[[], RunSink | None], resume: bool) -> Iterator[Any]:
    """Enter ``session`` (``cluster.connect.ray_session``); when that fails, the search never started (``abandon``).
    ``sink()``: the search's MLflow sink once it is open (the body opens it), else None."""
    with ExitStack() as stack:
        try:
            info = stack.enter_context(session)
        except BaseException:
            abandon(exp, sink(), resume)
            raise
        try:
            yield info
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (cluster.connect): resumable, its runs marked KILLED
            mark_killed(sink())
            raise


def mark_killed(sink: RunSink | None) -> None:
    """End the search's parent run and its trial runs still RUNNING as KILLED (``--resume`` reopens them)."""
    if sink is None or sink.parent_id is None:
        return
    with suppress(Exception):
        running = [r.info.run_id for r in sink.runs().values() if r.info.status == "RUNNING"]
        for run in [sink.parent_id, *running]:
            sink.client.set_terminated(run, status="KILLED")


def abandon(exp: Path, sink: RunSink | None, resume: bool) -> None:
    """Undo what a search that never started left: its parent run ends FAILED, a new search's folder goes."""
    if sink is not None and sink.parent_id:
        with suppress(Exception):
            sink.client.set_terminated(sink.parent_id, status="FAILED")
    if sink is not None:
        sink.close(timeout_s=0)
    if not resume:
        shutil.rmtree(exp, ignore_errors=True)
