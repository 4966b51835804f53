"""Real Ray nodes started with Ray's own CLI, as a cluster user starts them: ``ray start --head`` and
``ray start --address``, token authentication on, each node its own process tree (a new session), its own
temporary folder and its own ports, joined on 127.0.0.1; stopped by the ids of the processes in its session,
never with ``ray stop`` (which stops every Ray node of the user on the machine).

Plain helpers: the fixtures that use them are in ``tests/cluster/conftest.py``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.helpers import free_port

RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"  # this environment's Ray CLI


@dataclass
class RayNode:
    """One node: the session its processes run in (the id of the ``ray start`` that made it), its folder."""

    name: str
    session: int
    temp_dir: Path
    log: Path

    def pids(self) -> set[int]:
        """The live processes of this node (raylet, GCS on the head, workers and agents): those in its session."""
        out = set()
        for p in psutil.process_iter(["pid", "status"]):
            try:
                if os.getsid(p.pid) == self.session and p.info["status"] != psutil.STATUS_ZOMBIE:
                    out.add(p.pid)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return out

    def node_id(self) -> str:
        """The node's Ray id, as its raylet logs it when it starts."""
        text = "".join(p.read_text(errors="replace") for p in self.temp_dir.glob("session_*/logs/raylet.out"))
        found = re.findall(r"Setting node ID node_id=([0-9a-f]+)", text)
        assert found, f"{self.name}: no node id in its raylet log"
        return found[-1]


@dataclass
class RayNodes:
    """A cluster made of ``ray start`` nodes on this machine. ``env`` is what every node and every driver
    of the cluster gets: a home folder of its own (``~/.ray/auth_token`` is the cluster's token) and no
    ``RAY_*`` variable of the calling process."""

    root: Path
    env: dict[str, str]
    port: int = 0
    nodes: list[RayNode] = field(default_factory=list)

    @classmethod
    def create(cls) -> RayNodes:
        # A short folder under /tmp, not pytest's tmp_path: Ray's socket paths under it must stay within the
        # 107 bytes of an AF_UNIX address.
        root = Path(tempfile.mkdtemp(prefix="dedn-ray-", dir="/tmp"))
        home = root / "home"
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
        return cls(root, env)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return (Path(self.env["HOME"]) / ".ray" / "auth_token").read_text().strip()

    def generate_token(self) -> None:
        """The cluster's token in this cluster's ``~/.ray/auth_token``, made by ``ray get-auth-token``."""
        proc = subprocess.run([RAY, "get-auth-token", "--generate"], env=self.env, capture_output=True, timeout=120)
        assert proc.returncode == 0 and self.token, proc.stderr.decode()[-2000:]

    def start(
        self,
        name: str,
        num_cpus: int = 1,
        head: bool = False,
        timeout_s: float = 180,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> RayNode:
        """``RAY_AUTH_MODE=token ray start`` a head (``head=True``) or a worker joining ``address``, with ``extra``
        arguments and ``env`` added to the cluster's environment."""
        temp = self.root / name
        ports = {
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
        }
        if head:
            self.port = free_port()
            where = ["--head", "--port", str(self.port), "--include-dashboard", "false"]
        else:
            where = ["--address", self.address]
        argv = [RAY, "start", *where, "--num-cpus", str(num_cpus), "--temp-dir", str(temp), "--disable-usage-stats"]
        argv += [str(x) for kv in ports.items() for x in kv] + list(extra)
        log = self.root / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                argv,
                env={**self.env, **(env or {}), "RAY_AUTH_MODE": "token"},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own session: every process of the node, and only those
            )
        node = RayNode(name, proc.pid, temp, log)
        self.nodes.append(node)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        assert rc == 0, f"`ray start` of {name} ended with {rc}:\n{log.read_text()[-3000:]}"
        return node

    def active_node_ids(self) -> set[str]:
        """The nodes the head's autoscaler reports active (``ray status``, in token mode as every node)."""
        proc = subprocess.run(
            [RAY, "status", "--address", self.address],
            env={**self.env, "RAY_AUTH_MODE": "token"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        active = proc.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        return set(re.findall(r"node_([0-9a-f]{20,})", active))

    def wait_active(self, timeout_s: float = 90.0) -> None:
        """Until every node started is reported active."""
        want = {n.node_id() for n in self.nodes}
        end = time.time() + timeout_s
        while (seen := self.active_node_ids()) != want:
            assert time.time() < end, f"active nodes {sorted(seen)}, started {sorted(want)}"
            time.sleep(1.0)

    def stop(self, *nodes: RayNode, grace_s: float = 5.0, sig: signal.Signals = signal.SIGTERM) -> None:
        """``sig`` (SIGTERM) to every process of ``nodes`` (all nodes when none is named), SIGKILL what is left
        after ``grace_s``."""
        nodes = nodes or tuple(self.nodes)

        def alive() -> set[int]:
            return {pid for n in nodes for pid in n.pids()}

        for signum, wait in ((sig, grace_s), (signal.SIGKILL, 10.0)):
            for pid in alive():
                with suppress(ProcessLookupError):
                    os.kill(pid, signum)
            end = time.time() + wait
            while alive() and time.time() < end:
                time.sleep(0.2)
            if not alive():
                return
        raise AssertionError(f"processes {sorted(alive())} of {[n.name for n in nodes]} survived SIGKILL")

    def kill(self, node: RayNode) -> None:
        """SIGKILL every process of ``node`` at once, as a machine that loses power: nothing of it says goodbye."""
        self.stop(node, grace_s=0.0, sig=signal.SIGKILL)

    def stop_all(self) -> None:
        """Stop every node and remove the cluster's folder."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
