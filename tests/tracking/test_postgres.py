"""Production stores, real: MLflow runs and the Optuna study in a PostgreSQL server started here.

The server is PostgreSQL's own ``initdb`` and ``pg_ctl`` (Debian's ``postgresql`` package; ``.ci/run``
installs it when missing) in a temporary folder, on a free loopback port, with its socket in that folder.
PostgreSQL refuses to run as root, so under root it runs as ``nobody``. Password authentication over
TCP is on, so every URL carries a password, and no line the commands print may show it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pickle
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest

from tests.helpers import child_runs, cli_argv, free_port, trial_rows, wait_for, write_spec

USER, PASSWORD = "dedn", "pg-secret-7f3a"


def _postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs: beside ``initdb`` on PATH, else Debian's
    ``/usr/lib/postgresql/<version>/bin`` (which Debian keeps off PATH), the newest version first."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def _server_user() -> dict[str, Any]:
    """subprocess arguments that run a command as ``nobody`` when the tests run as root (PostgreSQL
    refuses root); nothing otherwise."""
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting to be reaped does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


@dataclass(frozen=True)
class Postgres:
    bindir: Path
    socket_dir: Path
    port: int

    def url(self, database: str) -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def createdb(self, database: str) -> str:
        """Create a database (over the server's socket, where local connections are trusted); its URL."""
        subprocess.run(
            [str(self.bindir / "createdb"), "-h", str(self.socket_dir), "-p", str(self.port), "-U", USER, database],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return self.url(database)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A real PostgreSQL server in a temporary folder on 127.0.0.1, stopped by its process id afterwards."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip(
            "PostgreSQL's initdb not found (on PATH or in /usr/lib/postgresql/*/bin): apt-get install postgresql"
        )
    as_server = _server_user()
    folder = Path(tempfile.mkdtemp(prefix="dedn-pg-"))  # short: the socket path has a 107-byte limit
    data = folder / "data"
    pid = None
    try:
        if as_server:
            os.chown(folder, as_server["user"], as_server["group"])
        pwfile = folder / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if as_server:
            os.chown(pwfile, as_server["user"], as_server["group"])
        subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", USER, f"--pwfile={pwfile}", "--auth-local=trust"]
            + ["--auth-host=scram-sha-256", "--no-locale", "-E", "UTF8", "--no-sync"],
            check=True,
            capture_output=True,
            timeout=120,
            **as_server,
        )
        port = free_port()
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={folder} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        subprocess.run(
            [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-o", options, "-w"]
            + ["-t", "60", "start"],
            check=True,
            capture_output=True,
            timeout=90,
            **as_server,
        )
        pid = int((data / "postmaster.pid").read_text().splitlines()[0])
        yield Postgres(bindir, folder, port)
    finally:
        if pid is not None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(
                    [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop"],
                    capture_output=True,
                    timeout=60,
                    **as_server,
                )
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                wait_for(lambda: not _alive(pid), 30, f"the postmaster (pid {pid}) to exit")
        shutil.rmtree(folder, ignore_errors=True)


SPEC = """
num_samples: 3
max_concurrent_trials: 2
params:
  optim.lr: {type: loguniform, low: 5.0e-4, high: 3.0e-3}
  loss.gamma: {type: loguniform, low: 1.0e-3, high: 0.3}
scheduler: {type: fifo}
"""


@dataclass(frozen=True)
class Searched:
    folder: Path
    experiment: Path
    tracking: str
    optuna: str
    output: str


@pytest.fixture(scope="module")
def searched(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory, tiny_store: Path) -> Searched:
    """``dedn search`` with its MLflow runs in one PostgreSQL database and its Optuna study in another."""
    folder = tmp_path_factory.mktemp("pg-search")
    tracking, study = postgres.createdb("mlflow"), postgres.createdb("optuna")
    spec = write_spec(folder, tiny_store, epochs=2, body=SPEC)
    args = ["search", "-c", str(spec), "--name", "pg", "--storage-path", str(folder / "runs")]
    proc = subprocess.run(
        cli_argv(*args, "--tracking-uri", tracking, "--optuna-storage", study),
        cwd=folder,  # a database store keeps MLflow's artifacts in mlruns/ of the working folder
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    return Searched(folder, folder / "runs" / "pg", tracking, study, output)


def _study(url: str, name: str) -> Any:
    from tuning.optuna_storage import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(url))


@pytest.mark.slow
def test_search_logs_runs_and_study_to_postgres(searched: Searched) -> None:
    from mlflow.tracking import MlflowClient

    from tracking.databases import normalized

    # the summary names both stores, their password masked; no line shows it
    assert PASSWORD not in searched.output
    masked_tracking = normalized(searched.tracking).replace(PASSWORD, "***")
    assert f"mlflow      {masked_tracking}   parent run " in searched.output
    assert f"optuna      optuna-dashboard {searched.optuna.replace(PASSWORD, '***')}\n" in searched.output

    # the MLflow runs are in PostgreSQL: a parent with the final test, a child per trial
    client = MlflowClient(tracking_uri=normalized(searched.tracking))
    children = child_runs(normalized(searched.tracking), "pg")
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)
    best = json.loads((searched.experiment / "best.json").read_text())
    parent = client.get_run(best["parent_run_id"])
    assert parent.data.metrics["test_H"] == pytest.approx(best["test"]["H"])
    assert "param_importance.png" in {
        a.path.split("/")[-1] for a in client.list_artifacts(best["parent_run_id"], "plots")
    }

    # the Optuna study is in the other database, each trial finished once and linked to its run
    assert optuna.get_all_study_names(normalized(searched.optuna)) == ["pg"]
    study = _study(searched.optuna, "pg")
    assert len(study.trials) == 3
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert {t.user_attrs["dedn.trial_id"] for t in study.trials} == {r.data.tags["dedn.trial_id"] for r in children}
    assert study.best_value == pytest.approx(best["best_metrics"]["val_H"])

    # nothing went to a file store: no optuna.db, no mlflow.db; the search recorded where its study is
    assert not list(searched.folder.rglob("*.db"))
    record = json.loads((searched.experiment / "search.json").read_text())
    assert record["options"]["optuna_storage"] == searched.optuna


@pytest.mark.slow
def test_promote_registers_and_verifies_against_postgres(searched: Searched) -> None:
    from mlflow.tracking import MlflowClient

    from tracking.databases import normalized

    proc = subprocess.run(
        cli_argv("promote", "--experiment", "pg", "--model-name", "dedn-pg", "--tracking-uri", searched.tracking),
        cwd=searched.folder,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "registered dedn-pg version 1: test figures of the final model reproduced" in output
    assert PASSWORD not in output
    uri = normalized(searched.tracking)
    version = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias("dedn-pg", "champion")
    parent_run_id = json.loads((searched.experiment / "best.json").read_text())["parent_run_id"]
    assert str(version.version) == "1" and version.tags["dedn.final_of_search"] == parent_run_id


def test_refusals_name_the_store_without_its_password(postgres: Postgres, tmp_path: Path, tiny_store: Path) -> None:
    """Refused before Ray starts and before anything is created, the URL named with its password masked: a
    database that does not exist, a server that does not answer, a malformed storage URL (command line or
    spec), a study name another search holds; for promote, a database without MLflow's tables."""
    from dedn.errors import DednInputError
    from tracking.databases import normalized
    from tracking.registry import promote
    from tracking.store import resolve_tracking_uri
    from tuning.search import SearchOptions, run_search

    spec = write_spec(tmp_path, tiny_store, epochs=1, body=SPEC)
    runs = tmp_path / "runs"

    def refusal(**options: Any) -> str:
        opts = SearchOptions(spec_path=str(spec), storage_path=str(runs), final_test=False, **options)
        with pytest.raises(DednInputError) as e:
            run_search(opts)
        assert not runs.exists()
        assert PASSWORD not in str(e.value)
        return str(e.value)

    nosuch = postgres.url("nosuch")
    masked = normalized(nosuch).replace(PASSWORD, "***")
    line = refusal(tracking_uri=nosuch)
    assert line.startswith(f"{masked}: tracking store: cannot be reached: OperationalError: ")
    assert 'database "nosuch" does not exist' in line
    closed = f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{free_port()}/optuna"
    line = refusal(track=False, optuna_storage=closed)
    assert line.startswith(f"{closed.replace(PASSWORD, '***')}: optuna storage: cannot be reached: ")
    assert "Connection refused" in line
    line = refusal(track=False, optuna_storage="mysql://u@h/db")
    assert line.startswith("mysql://u@h/db: --optuna-storage: must be sqlite:///PATH, postgresql://")
    taken = postgres.createdb("taken")
    optuna.create_study(study_name="pg", storage=normalized(taken))  # another search's study
    line = refusal(track=False, name="pg", optuna_storage=taken)
    assert line == (
        f"{taken.replace(PASSWORD, '***')}: --optuna-storage: already holds a study named 'pg': "
        "pick another --name, or --resume that search"
    )
    assert [t.number for t in optuna.load_study(study_name="pg", storage=normalized(taken)).trials] == []
    (tmp_path / "bad").mkdir()
    bad_spec = write_spec(tmp_path / "bad", tiny_store, epochs=1, body=SPEC + "optuna_storage: 'sqlite:///:memory:'\n")
    with pytest.raises(DednInputError, match=r"optuna_storage: .*must name a file"):
        run_search(SearchOptions(spec_path=str(bad_spec), storage_path=str(runs), track=False))
    assert not runs.exists()

    empty = postgres.createdb("empty")
    with pytest.raises(DednInputError) as e:
        promote(resolve_tracking_uri(empty), "pg", "m")
    assert str(e.value).startswith(f"{normalized(empty).replace(PASSWORD, '***')}: --tracking-uri: not an MLflow")
    from tracking.databases import database_tables

    assert database_tables(empty, "x") == set()  # promote created nothing in it


def test_socket_url_without_password(postgres: Postgres, tmp_path: Path) -> None:
    """``postgresql://USER@/DATABASE?host=SOCKET_FOLDER``: the server's local socket, where it trusts its
    users (the cluster head's form): accepted, reached, and the Optuna study stored there."""
    from tracking.databases import database_tables
    from tuning.optuna_storage import checked_storage, open_storage

    postgres.createdb("socket")
    url = f"postgresql://{USER}@/socket?host={postgres.socket_dir}&port={postgres.port}"
    assert checked_storage(url, tmp_path / "exp", "--optuna-storage", True, "s") == url
    assert database_tables(url, "x") == set()
    optuna.create_study(study_name="s", storage=open_storage(url))
    assert "studies" in database_tables(url, "x")
    assert optuna.get_all_study_names(open_storage(postgres.url("socket"))) == ["s"]  # the same database over TCP


def test_the_projects_tracking_store_leaves_what_mlflows_leaves_on_postgres(postgres: Postgres, tmp_path: Path) -> None:
    """``tracking.mlflow_store`` on PostgreSQL (``dedn+postgresql://``): the replay of tests/tracking/test_mlflow_store.py,
    against MLflow's own store on a second database of the same server."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from tests.tracking.test_mlflow_store import same_as_mlflows
    from tracking.databases import normalized

    theirs, ours = postgres.createdb("theirs"), postgres.createdb("ours")
    same_as_mlflows(lambda url: SqlAlchemyStore(normalized(url), str(tmp_path / "a")), theirs, ours)


@pytest.mark.slow
def test_killed_search_resumes_with_both_stores_in_postgres(
    postgres: Postgres, tmp_path: Path, tiny_store: Path
) -> None:
    """A search killed and resumed with MLflow and Optuna both in PostgreSQL.
    Over 80 lines on purpose: one scenario, each check right after the step it checks."""
    tracking, study_url = postgres.createdb("mlflow_resume"), postgres.createdb("optuna_resume")
    # a trial of this tiny model trains an epoch in ~0.1 s: 30 epochs keep the second one running for seconds, long
    # enough for the kill below to land in it (at 6, a trial could end between two polls)
    EPOCHS = 30
    spec = write_spec(
        tmp_path,
        tiny_store,
        epochs=EPOCHS,
        body="""
num_samples: 4
max_concurrent_trials: 1
params:
  optim.lr: {type: loguniform, low: 3.0e-4, high: 3.0e-3}
  loss.eps: {type: uniform, low: 0.0, high: 2.0}
scheduler: {type: fifo}
""",
    )
    exp = tmp_path / "runs" / "resume"
    args = ["search", "-c", str(spec), "--name", "resume", "--storage-path", str(tmp_path / "runs"), "--no-final-test"]
    proc = subprocess.Popen(
        cli_argv(*args, "--tracking-uri", tracking, "--optuna-storage", study_url),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0.5"},  # Tune's state written often: the kill lands mid-trial
    )
    try:

        def first_done_second_started():  # type: ignore[no-untyped-def]
            rows = trial_rows(exp)
            done = [k for k, v in rows.items() if v and v[-1]["epoch"] == EPOCHS]
            started = [k for k, v in rows.items() if v and v[-1]["epoch"] < EPOCHS]
            return done if done and started else None

        done = wait_for(first_done_second_started, 300, "a finished trial and a second one under way")
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray die at once
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    before = trial_rows(exp)
    r = subprocess.run(
        cli_argv("search", "-c", str(spec), "--resume", str(exp), "--no-final-test"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert PASSWORD not in r.stdout + r.stderr
    after = trial_rows(exp)
    assert len(after) == 4
    for k in done:  # the finished trial was not rerun
        assert after[k] == before[k]
    for k, v in after.items():  # every trial reached its last epoch
        assert sorted({x["epoch"] for x in v}) == list(range(1, EPOCHS + 1)), (k, [x["epoch"] for x in v])
    tune_ids = {v[0]["trial_id"] for v in after.values()}

    # Optuna, in PostgreSQL: each Tune trial is one COMPLETE trial; nothing is left RUNNING (a trial the
    # killed driver had asked for but not yet handed to Tune is closed FAIL on resume)
    study = _study(study_url, "resume")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["tune_trial_id"] for t in complete) == sorted(tune_ids)
    assert all(t.state.is_finished() for t in study.trials)
    assert all(t.state == optuna.trial.TrialState.FAIL for t in study.trials if t not in complete)

    # MLflow, in PostgreSQL: one child run per trial, continued across the kill, each epoch logged once
    from mlflow.tracking import MlflowClient

    from tracking.databases import normalized

    uri = normalized(tracking)
    runs = child_runs(uri, "resume")
    assert sorted(r.data.tags["dedn.trial_id"] for r in runs) == sorted(tune_ids)
    assert all(r.info.status == "FINISHED" for r in runs)
    client = MlflowClient(tracking_uri=uri)
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_H")]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), steps
    assert not list(tmp_path.rglob("*.db"))


def test_journal_file_storage_keeps_the_study_across_a_searcher_pickle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The searcher on Optuna's JournalStorage: trials asked and told, the searcher pickled (as Tune saves
    it) and restored, the study reopened from the journal file and continued."""
    from tuning.optuna_storage import checked_storage
    from tuning.space import DefineByRun, SearchSpec
    from tuning.study_searcher import StudySearcher

    monkeypatch.chdir(tmp_path)  # a relative journal path is taken from the working folder, recorded absolute
    url = checked_storage("journal:study.log", tmp_path / "exp", "--optuna-storage", True, "j")
    assert url == f"journal:{tmp_path / 'study.log'}"
    spec = SearchSpec.model_validate(
        {"base": "b.yaml", "params": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}
    )
    searcher = StudySearcher(DefineByRun(spec, False), None, url, "j", 0, None, "val_H", "max", 2)
    first = wait_for(lambda: searcher.suggest("t1"), 60, "the first configuration")
    assert first["optuna_trial"] == 0
    for epoch, h in ((1, 0.2), (2, 0.5)):
        searcher.on_trial_result("t1", {"epoch": epoch, "val_H": h})
    searcher.on_trial_complete("t1", {"epoch": 2, "val_H": 0.5})
    searcher.save(str(tmp_path / "searcher.json"))  # as Tune does before it pickles the experiment
    (tmp_path / "searcher.json").unlink()
    restored = pickle.loads(pickle.dumps(searcher))  # the storage is reopened from the URL
    second = wait_for(lambda: restored.suggest("t2"), 60, "the second configuration")
    assert second["optuna_trial"] == 1
    restored.on_trial_complete("t2", {"epoch": 1, "val_H": 0.1})  # stopped before its last epoch
    restored.flush()
    study = _study(url, "j")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    assert study.trials[0].value == 0.5 and study.trials[0].intermediate_values == {1: 0.2, 2: 0.5}
    assert study.trials[0].params["optim.lr"] == first["optim.lr"]
    assert [p.name for p in tmp_path.iterdir()] == ["study.log"]  # the journal, and no SQLite file


def test_storage_forms(tmp_path: Path) -> None:
    from tuning.optuna_storage import checked_storage, storage_rule

    for good in ("sqlite:///a.db", "sqlite:////abs/a.db?timeout=5", "journal:a.log", "postgresql://u:p@h:5432/db"):
        assert storage_rule(good) is None, good
    for bad in ("sqlite://", "sqlite:///:memory:", "journal:", "mysql://u@h/db", "postgresql://h/", "redis://h"):
        assert storage_rule(bad) is not None, bad
    default = checked_storage(None, tmp_path / "exp", "--optuna-storage", True, "x")
    assert default == f"sqlite:///{tmp_path}/exp/optuna.db"
    got = checked_storage(f"sqlite:///{tmp_path}/s.db?timeout=5", tmp_path, "--optuna-storage", True, "x")
    assert got == f"sqlite:///{tmp_path}/s.db?timeout=5"
    assert not (tmp_path / "s.db").exists()  # checking a storage that is not there yet opens nothing
