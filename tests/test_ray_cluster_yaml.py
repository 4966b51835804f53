"""``ray-cluster.yaml`` checked with Ray's own cluster-launcher validation, offline.

``ray up`` loads the YAML and calls ``_bootstrap_config``, which runs ``prepare_config`` (merge the
provider's defaults.yaml, merge setup commands, check docker, fill per-type worker counts) and then
``validate_config`` (JSON schema ``ray/autoscaler/ray-schema.json`` plus cross-field checks) before it
touches the cloud. These tests run the same two functions and stop there: nothing contacts AWS.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.helpers import ROOT

CLUSTER_YAML = ROOT / "ray-cluster.yaml"
PROJECT_DIR = "~/dedn-platform"


def _raw() -> dict[str, Any]:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)  # what `ray up` does


def _validated(config: dict[str, Any]) -> dict[str, Any]:
    """The offline part of ``ray up``'s ``_bootstrap_config``: ``prepare_config`` then ``validate_config``."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return _validated(_raw())


def _setup_commands(config: dict[str, Any], node: str) -> list[str]:
    # prepare_config merges setup_commands into head_setup_commands and worker_setup_commands.
    return config[f"{node}_setup_commands"]


def test_ray_validator_accepts_the_file(config: dict[str, Any]) -> None:
    raw = _raw()
    jsonschema.validate(raw, _ray_schema())  # the file itself, before defaults are merged in
    assert config["provider"]["type"] == "aws"
    assert config["cluster_name"] == "dedn"
    assert config["head_node_type"] in config["available_node_types"]


def test_head_is_cpu_only_and_a_worker_type_has_a_gpu(config: dict[str, Any]) -> None:
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU", 0) >= 1
    assert head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0  # filled in by prepare_config
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu_workers = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_workers, f"no worker node type with a GPU in {sorted(workers)}"
    for t in gpu_workers.values():
        assert t["min_workers"] == 0  # scale from zero: no idle GPU while no search runs
        assert 1 <= t["max_workers"] <= config["max_workers"]


def test_every_node_installs_this_project_from_its_file_mount(config: dict[str, Any]) -> None:
    mounts = config["file_mounts"]
    mounted = {remote.removeprefix(PROJECT_DIR + "/"): local for remote, local in mounts.items()}
    # What `pip install -e .` needs: pyproject.toml, its readme, and every package it installs.
    pyproject = _pyproject()
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert needed <= set(mounted), f"not mounted under {PROJECT_DIR}: {sorted(needed - set(mounted))}"
    for name in needed:
        assert (ROOT / mounted[name]).exists(), f"file_mounts source {mounted[name]!r} not in the repository"
    assert not any(local.rstrip("/") in ("", ".") for local in mounts.values()), (
        "mount named items, not the repository root (.venv/ and data/ would be hashed on every `ray up`)"
    )
    for node in ("head", "worker"):
        cmds = _setup_commands(config, node)
        install = [c for c in cmds if re.search(rf"cd {re.escape(PROJECT_DIR)} && pip install -e \.(\s|$)", c)]
        assert install, f"{node} setup does not `pip install -e .` in {PROJECT_DIR}"
        assert not any("constraints.txt" in c for c in cmds), "constraints.txt pins CPU torch; not on GPU nodes"


def test_storage_path_variable_is_an_s3_url_on_every_node(config: dict[str, Any]) -> None:
    for node in ("head", "worker"):
        values = re.findall(
            r"echo 'export DEDN_STORAGE_PATH=([^'\s]+)' >> ~/\.bashrc", "\n".join(_setup_commands(config, node))
        )
        assert len(values) == 1, f"{node}: DEDN_STORAGE_PATH set {len(values)} times"
        assert re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/\S*)?", values[0]), values[0]


def test_cluster_ray_matches_the_installed_ray(config: dict[str, Any]) -> None:
    import ray

    pins = re.findall(r"ray\[[^\]]*\]==([0-9][^\"'\s]*)", "\n".join(_setup_commands(config, "head")))
    assert pins == [ray.__version__], "pin the cluster's Ray to the version that runs `ray up`"


def test_start_commands_are_the_standard_ones(config: dict[str, Any]) -> None:
    head = config["head_start_ray_commands"]
    assert head[0] == "ray stop"
    assert "ray start --head --port=6379 --object-manager-port=8076" in head[-1]
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head[-1]
    worker = config["worker_start_ray_commands"]
    assert worker[0] == "ray stop"
    assert "ray start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076" in worker[-1]


def test_every_node_starts_ray_with_token_authentication_and_the_token(config: dict[str, Any]) -> None:
    """Each node's `ray start` runs in token mode and finds the token where Ray looks for it, copied from
    the token `ray get-auth-token --generate` made on the machine that runs `ray up`."""
    for node in ("head", "worker"):
        start = config[f"{node}_start_ray_commands"][-1]
        assert re.search(r"(^|;\s*)RAY_AUTH_MODE=token ray start ", start), f"{node}: {start}"
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert "ray get-auth-token --generate" in CLUSTER_YAML.read_text()


def _broken(kind: str) -> dict[str, Any]:
    bad = _raw()
    worker = next(n for n in bad["available_node_types"] if n != bad["head_node_type"])
    if kind == "unknown top-level key":
        bad["storage_path"] = "s3://my-bucket/dedn-experiments"
    elif kind == "node type without resources":
        del bad["available_node_types"][worker]["resources"]
    elif kind == "node type without node_config":
        del bad["available_node_types"][worker]["node_config"]
    elif kind == "fractional GPU count":
        bad["available_node_types"][worker]["resources"]["GPU"] = 0.5
    elif kind == "head_node_type not a node type":
        bad["head_node_type"] = "head.gpu"
    elif kind == "min_workers above max_workers":
        bad["available_node_types"][worker]["min_workers"] = bad["max_workers"] + 1
    return bad


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("unknown top-level key", "'storage_path' was unexpected"),
        ("node type without resources", "'resources' is a required property"),
        ("node type without node_config", "'node_config' is a required property"),
        ("fractional GPU count", "0.5 is not of type 'integer'"),
        ("head_node_type not a node type", "`head_node_type` must be one of `available_node_types`"),
        ("min_workers above max_workers", "global `max_workers` is smaller than the sum of `min_workers`"),
    ],
)
def test_ray_validator_rejects_broken_variants(kind: str, message: str) -> None:
    """The same path that accepts the file rejects each of these, so the acceptance is not a no-op."""
    bad = _broken(kind)
    prepared = prepare_config(copy.deepcopy(bad))  # preparing succeeds; validation is what rejects
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        validate_config(prepared)


def _ray_schema() -> dict[str, Any]:
    import json

    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _pyproject() -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())
