"""The adapter holding the project's use of Ray's private names (cluster.ray_internals): every name it relies on is
in the installed Ray and does what the adapter takes it to do. A Ray upgrade that moves one fails here."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from cluster import ray_internals
from tests.helpers import free_port


@pytest.mark.parametrize(
    "module, name", ray_internals.PRIVATE_NAMES, ids=[f"{m}.{n}" for m, n in ray_internals.PRIVATE_NAMES]
)
def test_every_private_name_the_adapter_uses_is_in_the_installed_ray(module: str, name: str | None) -> None:
    import ray

    found = importlib.import_module(module)
    assert name is None or hasattr(found, name), (
        f"ray {ray.__version__} has no {module}.{name}: rework cluster/ray_internals.py"
    )


def test_find_cluster_resolves_a_host_and_port_without_joining() -> None:
    port = free_port()
    found = ray_internals.find_cluster(f"127.0.0.1:{port}")
    assert found is not None and found.endswith(f":{port}")  # a loopback host becomes this machine's address


def test_the_probe_script_answers_unreachable_for_a_port_where_no_ray_listens() -> None:
    argv = [sys.executable, ray_internals.__file__, f"127.0.0.1:{free_port()}", "1000"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["result"] == "unreachable" and answer["detail"], answer


def test_node_types_names_a_node_started_by_hand_by_its_id() -> None:
    """A local instance has no autoscaler node types: its one node is reported as ``node_<its id>``, which is how
    ``cluster.connect`` tells a cluster that cannot grow."""
    from cluster.connect import can_grow, ray_session

    with ray_session(None, num_cpus=1):
        import ray

        ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        types = ray_internals.node_types()
        grows = can_grow()
    assert types == {f"node_{i}" for i in ids}, (types, ids)
    assert grows is False
