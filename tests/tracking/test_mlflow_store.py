"""tracking/mlflow_store.py: MLflow's private names it uses still exist; its store leaves, call for call, what
MLflow's SQL store leaves (runs, rows, latest metrics, errors) in one commit per batch; ``mlflow server`` serves it by the
``dedn+sqlite`` scheme, on a database MLflow's own store reads."""

from __future__ import annotations

import math
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

from tests.helpers import free_port, start_server
from tracking.mlflow_store import PREFIX, private_names, registry_store, tracking_store


def test_the_private_names_it_uses_exist_in_the_installed_mlflow() -> None:
    missing = [
        f"{getattr(owner, '__name__', owner)}.{name}" for owner, name in private_names() if not hasattr(owner, name)
    ]
    assert not missing, f"MLflow changed: tracking/mlflow_store.py uses {missing}"


def test_the_entry_points_name_this_module() -> None:
    for group, builder in (("mlflow.tracking_store", tracking_store), ("mlflow.model_registry_store", registry_store)):
        found = {e.name: e.load() for e in entry_points(group=group)}
        assert found.get(f"{PREFIX}sqlite") is builder and found.get(f"{PREFIX}postgresql") is builder


def _batches() -> list[tuple[list[Metric], list[Param], list[RunTag]]]:
    """The calls both stores get: duplicates within a batch and across batches, NaN and infinity, an older step than
    the latest, a tag set twice in one batch and again later, a changed param, a run name tag."""

    def m(key: str, value: float, step: int) -> Metric:
        return Metric(key, value, 1_000 + step, step)

    return [
        ([m("val_H", 0.5, 0), m("val_H", 0.5, 0), m("loss", math.nan, 0), m("loss", math.inf, 1), m("val_H", 0.7, 1)],
         [Param("lr", "0.1"), Param("beta", "2")], [RunTag("a", "1"), RunTag("a", "2")]),
        ([m("val_H", 0.7, 1), m("val_H", 0.6, 2)], [Param("lr", "0.1")], []),  # a metric already there
        ([m("val_H", 0.9, 0)], [Param("gamma", "3")], [RunTag("a", "3"), RunTag("b", "x")]),  # not the latest
        ([], [Param("lr", "0.2")], []),  # a changed param: MLflow's error
        ([m("x", 1.0, 1)], [], [RunTag("mlflow.runName", "renamed")]),
        ([], [], []),
    ]  # fmt: skip


def _refusal(call: Callable[[], Any], *ids: str) -> str:
    with pytest.raises(MlflowException) as refused:
        call()
    message = str(refused.value.message)
    for i in ids:
        message = message.replace(i, "ID")
    return message


def _info(run_info: Any) -> dict[str, Any]:
    """A RunInfo's fields but its ids, location and start (different in each store)."""
    return {k: getattr(run_info, k) for k in ("run_name", "user_id", "status", "end_time", "lifecycle_stage")}


def _replay(store: Any) -> dict[str, Any]:
    """Runs created, logged to and ended in ``store``: each call's outcome, commits per call, then each run as MLflow
    reads it (info, latest metrics, params, tags, every metric's history), and the refusals of a deleted run, a
    deleted experiment and a run name given twice."""
    commits = [0]
    sqlalchemy.event.listen(store.engine, "commit", lambda _: commits.__setitem__(0, commits[0] + 1))
    exp = store.create_experiment("e")
    made = store.create_run(exp, "u", 1_000, [RunTag("dedn.trial_id", "t0-m1")], "member")
    run_id = made.info.run_id
    assert made.info.artifact_uri == f"{store.get_experiment(exp).artifact_location}/{run_id}/artifacts"
    unnamed = store.create_run(exp, "u", 1_000, [RunTag("mlflow.runName", "by-tag")], None)
    generated = store.create_run(exp, "u", 1_000, [], None)
    assert generated.info.run_name and generated.data.tags == {"mlflow.runName": generated.info.run_name}
    ended = store.update_run_info(unnamed.info.run_id, RunStatus.FINISHED, 5_000, None)
    outcomes = []
    for metrics, params, tags in _batches():
        commits[0] = 0
        try:
            store.log_batch(run_id, metrics, params, tags)
            outcomes.append(("ok", commits[0]))
        except MlflowException as e:
            outcomes.append((str(e.message).replace(run_id, "RUN"), commits[0]))
    data = store.get_run(run_id).data
    history = {
        k: sorted((h.step, h.timestamp, h.value if not math.isnan(h.value) else "nan") for h in store.get_metric_history(run_id, k))
        for k in ("val_H", "loss", "x")
    }  # fmt: skip
    gone = store.create_run(exp, "u", 1_000, [], "gone").info.run_id
    store.delete_run(gone)
    dropped = store.create_experiment("dropped")
    store.delete_experiment(dropped)
    refusals = [
        _refusal(lambda: store.log_batch(gone, [Metric("val_H", 0.1, 1, 0)], [], []), gone),
        _refusal(lambda: store.update_run_info(gone, RunStatus.FINISHED, 1, None), gone),
        _refusal(lambda: store.create_run(dropped, "u", 1, [], "x"), dropped),
        _refusal(lambda: store.create_run(exp, "u", 1, [RunTag("mlflow.runName", "a")], "b")),
    ]
    metrics = {k: "nan" if math.isnan(v) else v for k, v in data.metrics.items()}
    runs = {k: (_info(r.info), r.data.tags) for k, r in (("made", made), ("unnamed", unnamed))}
    read = {k: (_info(store.get_run(r.info.run_id).info), store.get_run(r.info.run_id).data.tags)
            for k, r in (("made", made), ("unnamed", unnamed))}  # fmt: skip
    return {"outcomes": outcomes, "metrics": metrics, "params": data.params, "tags": data.tags, "history": history,
            "refusals": refusals, "created": runs, "read": read, "ended": _info(ended)}  # fmt: skip


def same_as_mlflows(make: Callable[[str], Any], mlflow_url: str, ours_url: str) -> None:
    """``make(url)`` a store on each database; the replay must match but for the commits, one per batch of ours."""
    theirs, ours = _replay(make(mlflow_url)), _replay(tracking_store(PREFIX + ours_url))
    for k in ("metrics", "params", "tags", "history", "refusals", "created", "read", "ended"):
        assert ours[k] == theirs[k], k
    assert [o for o, _ in ours["outcomes"]] == [o for o, _ in theirs["outcomes"]]
    assert "Changing param values is not allowed" in ours["outcomes"][3][0]
    assert ours["outcomes"][0] == ("ok", 1) and ours["outcomes"][2] == ("ok", 1)  # params, metrics, tags: one commit
    assert theirs["outcomes"][0][1] >= 3  # MLflow's: one per kind (what the store saves)


def test_log_batch_leaves_what_mlflows_store_leaves_in_one_commit(tmp_path: Path) -> None:
    same_as_mlflows(
        lambda url: SqlAlchemyStore(url, str(tmp_path / "a1")), f"sqlite:///{tmp_path / 'm.db'}", f"sqlite:///{tmp_path / 'd.db'}"
    )  # fmt: skip
    assert (tmp_path / "d.db").is_file()  # the plain database URL: MLflow's own store can open it


def test_mlflow_server_serves_the_scheme_on_a_database_mlflow_reads(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    port = free_port()
    db = tmp_path / "served.db"
    proc = start_server(tmp_path / "server", port, backend=f"{PREFIX}sqlite:///{db}")
    try:
        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        exp = client.create_experiment("served")
        run_id = client.create_run(exp, run_name="member", tags={"dedn.trial_id": "t0-m0"}).info.run_id
        metrics = [Metric("val_H", 0.1 * e, 1_000 + e, e) for e in range(5)]
        client.log_batch(run_id, metrics, [Param("lr", "0.1")], [RunTag("a", "1")])
        client.set_terminated(run_id, "FINISHED")
        registered = client.create_registered_model("dedn-served")  # the registry entry point: the same database
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    plain = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = plain.get_run(run_id)
    assert (run.info.status, run.data.params, run.data.tags["a"]) == ("FINISHED", {"lr": "0.1"}, "1")
    assert [(h.step, h.value) for h in plain.get_metric_history(run_id, "val_H")] == [(e, 0.1 * e) for e in range(5)]
    assert plain.get_registered_model(registered.name).name == "dedn-served"


def test_the_project_writes_databases_through_it_and_servers_as_they_are() -> None:
    from tracking.mlflow_store import served

    assert served("sqlite:////data/mlflow.db") == "dedn+sqlite:////data/mlflow.db"
    for pg in ("postgresql://u@h/db", "postgres://u@h/db", "postgresql+psycopg2://u@h/db"):
        assert served(pg) == "dedn+postgresql://u@h/db"
    for other in ("http://127.0.0.1:5000", "postgresql+pg8000://u@h/db", "file:///tmp/mlruns", "dedn+sqlite:///x.db"):
        assert served(other) == other


def test_what_it_does_not_cover_is_refused_on_a_server_and_left_to_mlflow_in_the_sink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.server.constants import READ_REPLICA_BACKEND_STORE_URI_ENV_VAR

    from dedn.errors import DednInputError
    from tracking.mlflow_store import REPLICA, served

    assert REPLICA == READ_REPLICA_BACKEND_STORE_URI_ENV_VAR  # the name MLflow's server sets
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    for name, value, what in ((REPLICA, uri, "read replica"), ("MLFLOW_ENABLE_WORKSPACES", "true", "workspaces")):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with pytest.raises(DednInputError, match=f"backend store: .*{what}.* without dedn\\+"):
                tracking_store(PREFIX + uri)
            with pytest.raises(DednInputError) as refused:  # a password in the URL never reaches the message
                tracking_store(f"{PREFIX}postgresql://dedn:pg-secret@127.0.0.1/mlflow")
            assert "pg-secret" not in str(refused.value) and "dedn:***@" in str(refused.value)
            assert served(uri) == uri
    assert served(uri) == PREFIX + uri
