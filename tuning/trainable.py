"""The Ray Tune trainable, around ``dedn.train.train``: each epoch reports validation metrics with a checkpoint
(model, optimiser, history, best weights); a retried or resumed trial continues from the last one."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cluster.objects import SharedStore, is_object_store_view
from dedn.checkpoints import TRIAL_PROGRESS, TRIAL_STATE, load_trial_state, save_trial_state
from dedn.records import EpochRecord, Progress
from dedn.train import train
from dedn.trunk import sha256_file
from tuning.space import sampled_params, trial_config

__all__ = ["EpochReporter", "dedn_trainable", "epoch_metrics", "trial_setup", "wants_checkpoint"]

REPORTS = "reports.json"  # in each trial checkpoint: what EpochReporter needs to resume from it


def epoch_metrics(record: EpochRecord, posthoc: bool) -> dict[str, float]:
    """What a trial reports each epoch, at the sampled inference point or with ``posthoc`` at the best point of the
    validation grid. ``val_objective`` (the spec's objective: H, AUSUC, U@S>=x, ...) is what the scheduler and
    Optuna see and what picks the best trial; ``val_AUSUC`` the area under that point's seen/unseen curve."""
    point = record.grid_best if posthoc else record.eval
    return {
        "epoch": record.epoch,
        **{f"val_{k}": point[k] for k in ("H", "U", "S", "T")},
        "val_AUSUC": point.get("AUSUC", 0.0),
        "val_objective": point.get("objective", point["H"]),
        "val_H_configured": record.eval["H"],
        "val_H_grid": record.grid_best["H"],
        **{f"grid_{k}": record.grid_best[k] for k in ("lambda_rc", "lambda_e", "c")},
        "samples_per_s": record.samples_per_s,
        "epoch_seconds": record.seconds,
        **{f"loss_{k}": v for k, v in record.loss.items()},
    }


def trial_setup(
    shared: SharedStore, load_state: Callable[[str], dict[str, Any]]
) -> tuple[Any, str, bool, dict[str, Any] | None, EpochReporter]:
    """A trial's first steps. Returns (the store as an object-store view, node id, features zero-copy?, the state to
    continue from read with ``load_state`` or None on a first start, the reporter)."""
    import ray
    from ray import tune

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # no line per saved checkpoint
    ctx = ray.get_runtime_context()
    torch.set_num_threads(max(1, int(ctx.get_assigned_resources().get("CPU", 1.0))))
    store = shared.materialize()
    reporter = EpochReporter()
    checkpoint = tune.get_checkpoint()
    resume = None if checkpoint is None else reporter.restore(checkpoint, load_state)
    return store, ctx.get_node_id(), is_object_store_view(store.features()), resume, reporter


def wants_checkpoint(epoch: int, last_epoch: int, every: int, improved: bool) -> bool:
    """Every ``every`` epochs, at the last, and whenever the best epoch improved (its weights always persist)."""
    return improved or epoch == last_epoch or epoch % every == 0


class EpochReporter:
    """Reports a trial's epochs to Tune and keeps its checkpoints resumable whenever the driver dies.

    Tune's retention (``num_to_keep``) deletes checkpoint folders its last saved experiment state may still name, so
    a killed driver left ``--resume`` unable to continue. So Tune keeps every folder (``num_to_keep=None``) and the
    reporter removes ``state.pt`` from all but the newest ``keep``. A trial resumed from an emptied folder continues
    from the next whole one, first reporting again the epochs in between, as Tune would have seen them without the kill.
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self.sent: list[dict[str, Any]] = []  # every result reported so far, as reported

    def report(self, metrics: dict[str, Any], checkpoint: bool, save: Callable[[str], None]) -> None:
        """Report one epoch (``checkpointed`` says whether a checkpoint came with it); with ``checkpoint``,
        ``save(folder)`` writes the state into a temporary folder that Tune then persists."""
        metrics["checkpointed"] = checkpoint
        if "val_objective" in metrics:  # what the scheduler ranks by: the trial's best epoch so far
            got = [float(m["val_objective"]) for m in [metrics, *self.sent] if "val_objective" in m]
            metrics["val_objective_best"] = max(got)
        self.sent.append(dict(metrics))
        if not checkpoint:
            _tune_report(metrics, None)
            return
        with tempfile.TemporaryDirectory() as folder:
            save(folder)
            # the results so far and a digest of state.pt, which makes the folder whole
            digest = sha256_file(Path(folder) / TRIAL_STATE)
            stamp = {"epoch": int(metrics["epoch"]), "state_sha256": digest, "sent": self.sent}
            (Path(folder) / REPORTS).write_text(json.dumps(stamp))
            _tune_report(metrics, folder)
        self._prune()

    def restore(self, checkpoint: Any, load_state: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
        """The state to continue from, given the checkpoint Tune restored the trial with."""
        named = _local_folder(checkpoint)
        if named is None:  # not on a local or mounted file system: Tune's folder as it is
            with checkpoint.as_directory() as folder:
                self.sent = _json_field(Path(folder) / REPORTS, "sent", list) or []
                return load_state(folder)
        named_epoch = _epoch(named)
        for folder in _resume_candidates(named, named_epoch):
            try:
                state = load_state(str(folder))
            except Exception:  # a folder torn by the kill: try the next one
                continue
            self.sent = _json_field(folder / REPORTS, "sent", list) or []
            replay = [m for m in self.sent if named_epoch is not None and int(m["epoch"]) > named_epoch]
            for m in replay[:-1]:
                _tune_report({**m, "checkpointed": False}, None)
            if replay:  # the last replayed epoch carries the checkpoint it came from, whole again
                with tempfile.TemporaryDirectory() as tmp:
                    shutil.copytree(folder, tmp, dirs_exist_ok=True)
                    _tune_report({**replay[-1], "checkpointed": True}, tmp)
                self._prune()
            return state
        raise FileNotFoundError(f"{named}: no whole checkpoint to continue this trial from")

    def _prune(self) -> None:
        """Empty every whole checkpoint folder of this trial but the newest ``keep`` (by epoch, then time)."""
        from ray import tune

        latest = _local_folder(tune.get_checkpoint())
        if latest is None:
            return
        whole = [f for f in latest.parent.glob("checkpoint_*") if (f / TRIAL_STATE).is_file()]
        whole.sort(key=lambda f: (_epoch(f) or -1, (f / TRIAL_STATE).stat().st_mtime))
        for folder in whole[: -self.keep]:
            if folder != latest:
                (folder / TRIAL_STATE).unlink(missing_ok=True)


def _tune_report(metrics: dict[str, Any], folder: str | None) -> None:
    from ray import tune

    tune.report(metrics, checkpoint=None if folder is None else tune.Checkpoint.from_directory(folder))


def _local_folder(checkpoint: Any) -> Path | None:
    """A Tune checkpoint's folder when it is on this machine's file system (local or mounted)."""
    if checkpoint is None or getattr(checkpoint.filesystem, "type_name", "") != "local":
        return None
    folder = Path(checkpoint.path)
    return folder if folder.is_dir() else None


def _json_field(path: Path, key: str, cast: Callable[[Any], Any]) -> Any:
    """``cast`` of ``key`` in the JSON file ``path``; None when it is missing or malformed."""
    try:
        return cast(json.loads(path.read_text())[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _epoch(folder: Path) -> int | None:
    """The epoch a checkpoint folder was saved after (its reports.json, else progress.json)."""
    epochs = (_json_field(folder / name, "epoch", int) for name in (REPORTS, TRIAL_PROGRESS))
    return next((e for e in epochs if e is not None), None)


def _whole(folder: Path) -> bool:
    """state.pt present and the one reports.json describes (if any: older folders have none)."""
    state, stamp = folder / TRIAL_STATE, folder / REPORTS
    if not state.is_file():
        return False
    return not stamp.exists() or _json_field(stamp, "state_sha256", str) == sha256_file(state)


def _resume_candidates(named: Path, named_epoch: int | None) -> list[Path]:
    """The named folder when whole, else this trial's whole folders after it, earliest epoch first."""
    if _whole(named):
        return [named]
    later = [
        (e, f)
        for f in named.parent.glob("checkpoint_*")
        if f != named and (e := _epoch(f)) is not None and (named_epoch is None or e > named_epoch)
    ]
    return [f for _, f in sorted(later) if _whole(f)]


def dedn_trainable(
    config: dict[str, Any], shared: SharedStore, base: dict[str, Any], posthoc: bool, checkpoint_every: int = 1
) -> None:
    """One trial: sampled values from ``config`` over the base training config, on the shared store."""
    store, node, zero_copy, resume, reporter = trial_setup(shared, load_trial_state)
    cfg = trial_config(base, sampled_params(config))
    last_epoch = cfg.effective().optim.epochs

    def report(record: EpochRecord, p: Progress) -> None:
        metrics = {**epoch_metrics(record, posthoc), "node_id": node, "features_zero_copy": zero_copy}
        checkpoint = wants_checkpoint(record.epoch, last_epoch, checkpoint_every, p.best_epoch == record.epoch)
        reporter.report(metrics, checkpoint, lambda folder: save_trial_state(folder, record, p))

    train(cfg, store, "validation", on_epoch=report, resume=resume, select_on="grid" if posthoc else "configured")
