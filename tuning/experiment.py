"""A search's experiment folder and its MLflow tracker around Ray's session (``tuning.search.run_search``).

The folder is ``<storage>/<name>/``: ``check_experiment_name`` keeps a name to one folder under the storage path,
``experiment_path`` reads ``--resume``'s folder-or-name. ``start_tracker`` creates (or on resume reopens, after
checking that the state file names this search's runs) the parent run; ``joined_or_abandoned`` enters Ray's
session, and when that fails undoes what the search made (``abandon``), and when the search is stopped (Ctrl-C,
SIGTERM) ends its runs KILLED for ``--resume`` (``mark_killed``).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dedn.errors import DednInputError

if TYPE_CHECKING:
    from tracking.runs import Tracker
    from tuning.search import SearchOptions

__all__ = [
    "abandon",
    "check_experiment_name",
    "checked_tracking_uri",
    "experiment_dir",
    "experiment_path",
    "joined_or_abandoned",
    "mark_killed",
    "start_tracker",
]


def check_experiment_name(name: str, field: str = "--name") -> None:
    """An experiment name is one folder name under the storage path: not empty, not '.' or '..', no '/' or
    '\\', not absolute (nor a NUL byte). Checked before anything is created; raises DednInputError."""
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
    return storage_path, name_or_path


def checked_tracking_uri(opts: SearchOptions) -> str:
    """The tracking store the search will log to, refused before any trial runs when it is a file store
    and the search joins a cluster, or when it cannot be reached."""
    from tracking.runs import check_not_scattered, check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(opts.tracking_uri)
    check_not_scattered(uri, joins_cluster=opts.address is not None)
    check_reachable(uri)
    return uri


def start_tracker(opts: SearchOptions, exp: Path, name: str, store: Any, resume: bool = False) -> Tracker:
    """The search's MLflow tracker, with its parent run created (or on resume reopened). If that fails, a
    new search's folder goes again (its run, if made, ends FAILED)."""
    from dedn.checkpoints import checkpoint_header
    from tracking.runs import Tracker
    from tuning.report import parent_tags

    assert opts.tracking_uri is not None
    tracker = Tracker(opts.tracking_uri, exp, name)
    if resume:  # before any run is reopened or (on failure) ended: they must be this search's
        from tracking.run_state import check_state_runs

        check_state_runs(tracker.client, tracker.state, name, exp)
    try:
        tracker.parent(
            parent_tags(store, opts.spec_path, opts.posthoc_inference), opts.spec_path, checkpoint_header(store)
        )
    except BaseException:
        abandon(exp, tracker, resume)
        raise
    return tracker


@contextmanager
def joined_or_abandoned(session: Any, exp: Path, tracker: Tracker | None, resume: bool) -> Iterator[Any]:
    """Enter ``session`` (cluster.connect.ray_session); when that fails (no cluster at --address), the
    search never started: its MLflow run ends FAILED and a new search's half-made folder is removed."""
    with ExitStack() as stack:
        try:
            info = stack.enter_context(session)
        except BaseException:
            abandon(exp, tracker, resume)
            raise
        try:
            yield info
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (cluster.connect): resumable, its runs marked KILLED
            mark_killed(tracker)
            raise


def mark_killed(tracker: Tracker | None) -> None:
    """End the search's parent run and its trial runs still RUNNING as KILLED (``--resume`` reopens them)."""
    if tracker is None:
        return
    with suppress(Exception):
        tracker.reload()
    runs = [tracker.state.get("parent"), *tracker.state.get("trials", {}).values()]
    for run in [str(r) for r in runs if r]:
        with suppress(Exception):
            if tracker.client.get_run(run).info.status == "RUNNING":
                tracker.client.set_terminated(run, status="KILLED")


def abandon(exp: Path, tracker: Tracker | None, resume: bool) -> None:
    """Undo what a search that never started left: its parent run ends FAILED; the folder of a new search
    (made by this command, nothing of Tune's in it yet) is removed. A resumed folder is kept."""
    parent = tracker.state.get("parent") if tracker is not None else None
    if tracker is not None and parent:
        with suppress(Exception):
            tracker.client.set_terminated(str(parent), status="FAILED")
    if not resume:
        shutil.rmtree(exp, ignore_errors=True)
