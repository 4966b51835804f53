"""Fixtures of the cluster tests: a cluster of real ``ray start`` nodes with token authentication on
(``tests/cluster/nodes.py`` starts and stops them)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.nodes import RayNodes


@pytest.fixture(scope="module")
def token_cluster() -> Iterator[RayNodes]:
    """A head and one worker, one CPU each, started by hand as a cluster user does: a token made with
    ``ray get-auth-token --generate`` in the cluster's home folder, then ``RAY_AUTH_MODE=token ray start
    --head`` and ``ray start --address 127.0.0.1:PORT``. Both nodes are active when the tests start; a test
    may stop one (``token_cluster.stop(node)``), so the fixture is per module."""
    nodes = RayNodes.create()
    try:
        nodes.generate_token()
        nodes.start("head", head=True)
        nodes.start("worker")
        nodes.wait_active()
        yield nodes
    finally:
        nodes.stop_all()
