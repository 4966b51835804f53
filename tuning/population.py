"""Population trials: each Ray Tune trial trains M configurations as one batched model (dedn.population), each
member its own Optuna trial (``tuning.study_searcher``).

``population_trainable`` reports every epoch the best active member as ``val_H`` (what Tune's scheduler sees) and
every member's record under ``members``, as a row of values in the order ``member_columns`` names (``section`` reads
them back as dicts). Rows, not nested dicts: Tune flattens a result's dicts and keeps running statistics of every
number in them, in the driver, for every result. A population checkpoint holds ``state.pt`` (the active members'
batched model and optimiser, every member's best-epoch weights and history; ``weights_only``) and ``progress.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from cluster.objects import SharedStore
from dedn.checkpoints import TRIAL_PROGRESS, TRIAL_STATE, read_trial_state
from tuning.space import sampled_params, trial_config

__all__ = [
    "configurations",
    "member_key",
    "best_weights",
    "population_metrics",
    "population_trainable",
    "section",
    "write_member_checkpoint",
]


def member_key(trial_id: str, member: int | None) -> str:
    """The key of one configuration of a Tune trial: the trial id, ``<trial id>-m<j>`` for member j of a population.
    It names the configuration's MLflow run (tag ``dedn.trial_id``) and Optuna trial (user attribute ``dedn.trial_id``);
    with the trial's name (``trial-003``) in place of its id, the run's name and the legend of the plots."""
    return trial_id if member is None else f"{trial_id}-m{member}"


def configurations(config: Any) -> list[tuple[int | None, dict[str, Any]]]:
    """(member index, sampled values) of each configuration a Tune trial trains: (None, its values) for a single
    trial, one per member for a population (``config["members"]``)."""
    config = config if isinstance(config, dict) else {}
    members = config.get("members")
    if isinstance(members, list):
        return [(j, dict(m)) for j, m in enumerate(members)]
    return [(None, sampled_params(config))]


def section(result: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    """``result[name]`` as {member: {key: value}}, from a result nested (callbacks) or flattened to ``name/<member>``
    and ``name/<member>/<key>`` (searchers); a member's row of values is read with the result's ``member_columns``."""
    nested = result.get(name)
    prefix = name + "/"
    if not isinstance(nested, dict):
        nested = {}
        for k, v in result.items():
            if k.startswith(prefix):
                member, _, key = k[len(prefix) :].partition("/")
                if key:
                    nested.setdefault(member, {})[key] = v
                else:
                    nested[member] = v
    columns = result.get("member_columns")
    return {j: dict(zip(columns, v, strict=True)) if isinstance(v, list) and columns else v for j, v in nested.items()}


def population_metrics(epoch: int, records: dict[int, Any], p: Any, size: int, posthoc: bool) -> dict[str, Any]:
    """What a population trial of ``size`` members reports for ``epoch``: the members trained under ``members``, those
    that ended this epoch under ``ended``, the leading member's metrics as the trial's own, the throughput."""
    from tuning.trainable import epoch_metrics

    per = {str(j): epoch_metrics(r, posthoc) for j, r in records.items()}
    ended = {
        str(j): {"status": p.status[j], "reason": p.reasons[j]}
        for j in range(size)
        if p.status[j] in ("stopped", "failed") and p.last_epoch[j] == epoch
    }
    columns = list(next(iter(per.values()))) if per else []
    rows = {j: [m[c] for c in columns] for j, m in per.items()}
    metrics: dict[str, Any] = {"epoch": epoch, "members": rows, "member_columns": columns, "ended": ended}
    if per:
        lead = max(per, key=lambda j: per[j]["val_objective"])
        metrics.update({k: v for k, v in per[lead].items() if k != "epoch"})
        metrics["val_member"] = int(lead)
        metrics["population_samples_per_s"] = next(iter(records.values())).samples_per_s * len(records)
    metrics["members_trained"] = len(records)
    metrics["members_active"] = len(p.active)
    metrics["peak_device_mb_per_member"] = p.peak_device_bytes / 2**20 / max(1, len(records))
    return metrics


def save_population_checkpoint(folder: str, epoch: int, progress: Any, members: list[dict[str, Any]]) -> None:
    from dedn.population import population_state

    torch.save(population_state(epoch, progress), os.path.join(folder, TRIAL_STATE))
    saved = {
        "epoch": epoch,
        "population": True,
        "members": members,
        "partitions": [[int(i) for i in p] for p in progress.partitions],
        "status": list(progress.status),
        "best_epoch": list(progress.best_epoch),
    }
    Path(folder, TRIAL_PROGRESS).write_text(json.dumps(saved))


def population_trainable(
    config: dict[str, Any],
    shared: SharedStore,
    base: dict[str, Any],
    posthoc: bool,
    halving: dict[str, Any] | None,
    checkpoint_every: int = 1,
) -> None:
    """One Tune trial training ``config["members"]`` as one population on the shared store."""
    from dedn.population import Halving, train_population
    from tuning.trainable import trial_setup, wants_checkpoint

    store, node, zero_copy, resume, reporter = trial_setup(shared, lambda f: read_trial_state(f)[0])
    members = list(config["members"])
    cfgs = [trial_config(base, m) for m in members]
    last_epoch = cfgs[0].effective().optim.epochs

    def report(epoch: int, records: dict[int, Any], p: Any) -> None:
        metrics = population_metrics(epoch, records, p, len(members), posthoc)
        metrics.update({"node_id": node, "features_zero_copy": zero_copy})
        improved = any(p.best_epoch[j] == epoch for j in records) or bool(metrics["ended"])
        checkpoint = wants_checkpoint(epoch, last_epoch, checkpoint_every, improved)
        reporter.report(metrics, checkpoint, lambda folder: save_population_checkpoint(folder, epoch, p, members))

    results = train_population(
        cfgs,
        store,
        "validation",
        on_epoch=report,
        halving=Halving(**halving) if halving else None,
        select_on="grid" if posthoc else "configured",
        resume=resume,
    )
    if all(r.status == "failed" for r in results):
        reasons = "; ".join(f"member {r.index}: {r.reason}" for r in results)
        raise FloatingPointError(f"every member of the population failed: {reasons}")


def best_weights(checkpoint_path: str | os.PathLike[str], member: int | None) -> dict[str, torch.Tensor]:
    """The best-epoch weights (a single-configuration DEDN state dict) in a trial checkpoint."""
    state = read_trial_state(checkpoint_path)[0]  # a single trial's state.pt too
    return state["best_model"] if member is None else state["best_state"][member]


def write_member_checkpoint(population_folder: str | os.PathLike[str], member: int, out: Path) -> Path:
    """A single-trial checkpoint folder (state.pt with ``best_model``, progress.json with the partition and
    history) for one member of a population checkpoint: what ``dedn promote`` reads from a child run."""
    state = read_trial_state(population_folder)[0]
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"best_model": state["best_state"][member]}, out / TRIAL_STATE)
    partitions = json.loads((Path(population_folder) / TRIAL_PROGRESS).read_text())["partitions"]
    progress = {
        "epoch": state["last_epoch"][member],
        "best_epoch": state["best_epoch"][member],
        "partition": partitions[member],
        "status": state["status"][member],
        "history": state["histories"][member],
    }
    (out / TRIAL_PROGRESS).write_text(json.dumps(progress))
    return out
