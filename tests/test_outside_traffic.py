"""The quick start talks to nobody but this machine: traced with strace (every process it starts, Ray's included), it
opens no connection to an address that is not loopback and sends no DNS query for another host than this one."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT, cli_argv

# what the product must turn off itself, and settings of this machine a fresh one would not have
_UNSET = (
    "RAY_USAGE_STATS_ENABLED",
    "MLFLOW_DISABLE_TELEMETRY",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
    "RAY_ADDRESS",
    *(p + s for p in ("http", "https", "all", "no", "HTTP", "HTTPS", "ALL", "NO") for s in ("_proxy", "_PROXY")),
)
_CONNECT = re.compile(r"connect\(\d+, \{sa_family=AF_INET6?, sin6?_port=htons\((\d+)\), (.*?)\}, \d+\)?")
_ADDRESS = re.compile(r'(?:inet_addr|inet_pton)\((?:AF_INET6?, )?"((?:\\x[0-9a-f]{2})+)"')
_BYTES = re.compile(r'"((?:\\x[0-9a-f]{2})+)"')


def _hex(text: str) -> bytes:
    return bytes.fromhex(text.replace("\\x", ""))


def dns_question(payload: bytes) -> str | None:
    """The name a DNS query asks for, or None when ``payload`` is not one query (RFC 1035: a 12-byte header, one
    question of labels ending in a zero byte, then type and class, nothing after)."""
    if len(payload) < 17 or payload[2] & 0x80 or payload[4:6] != b"\0\1" or payload[6:8] != b"\0\0":
        return None
    labels, i = [], 12
    while i < len(payload) and payload[i]:
        n = payload[i]
        if n > 63 or i + 1 + n > len(payload):
            return None
        labels.append(payload[i + 1 : i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    if i + 5 > len(payload):
        return None
    rest = payload[i + 5 :]
    if rest and not (rest[0] == 0 and payload[11] >= 1):  # an EDNS record may follow (ARCOUNT >= 1)
        return None
    return ".".join(labels).lower()


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def outside_traffic(trace: str, own_names: set[str]) -> list[str]:
    """Each line of an ``strace -xx`` trace that connects to a non-loopback address (port 53 aside: the resolver's
    own server, judged by the queries sent) or sends a DNS query for a name not in ``own_names``."""
    bad = []
    for line in trace.splitlines():
        m = _CONNECT.search(line)
        if m:
            addr = _ADDRESS.search(m.group(2))
            if addr and not is_loopback(_hex(addr.group(1)).decode()) and m.group(1) != "53":
                bad.append(line)
        if re.search(r"\bsend(?:to|msg|mmsg)\(", line):
            for payload in _BYTES.findall(line):
                name = dns_question(_hex(payload))
                if name is not None and name.rstrip(".") not in own_names:
                    bad.append(f"DNS query for {name}: {line}")
    return bad


def test_the_parser_catches_what_it_must() -> None:
    """The trace reader, on lines of the form strace writes: a cloud metadata connect and a DNS query are caught,
    loopback and this host's own name are not."""

    def hexed(b: bytes) -> str:
        return "".join(f"\\x{c:02x}" for c in b)

    query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x08metadata\x06google\x08internal\x00\x00\x01\x00\x01"
    own = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x04node\x00\x00\x1c\x00\x01"
    trace = "\n".join(
        [
            f'1 connect(3, {{sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("{hexed(b"169.254.169.254")}")}}, 16) = -1',
            f'1 connect(3, {{sa_family=AF_INET, sin_port=htons(6379), sin_addr=inet_addr("{hexed(b"127.0.0.1")}")}}, 16) = 0',
            f'1 connect(3, {{sa_family=AF_INET6, sin6_port=htons(1), sin6_flowinfo=htonl(0), inet_pton(AF_INET6, "{hexed(b"::ffff:127.0.0.1")}", &sin6_addr), sin6_scope_id=0}}, 28) = 0',
            f'1 connect(3, {{sa_family=AF_INET6, sin6_port=htons(1), sin6_flowinfo=htonl(0), inet_pton(AF_INET6, "{hexed(b"::ffff:192.0.2.2")}", &sin6_addr), sin6_scope_id=0}}, 28) = 0',
            f'1 sendmmsg(5, [{{msg_hdr={{msg_name=NULL, msg_iov=[{{iov_base="{hexed(query)}", iov_len=42}}]}}}}], 1, 0) = 1',
            f'1 sendto(5, "{hexed(own)}", 22, MSG_NOSIGNAL, NULL, 0) = 22',
        ]
    )
    bad = outside_traffic(trace, {"node"})
    assert len(bad) == 3, bad
    assert "htons(80)" in bad[0]
    assert "htons(1)" in bad[1] and bad[2].startswith("DNS query for metadata.google.internal")


@pytest.mark.slow  # the whole quick start under strace, every process traced: about 1.5 minutes here
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (.ci/run installs it)")
def test_the_traced_quick_start_stays_on_this_machine(tmp_path: Path, tiny_store: Path) -> None:
    probe = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.strip()[:200]}")
    env = {k: v for k, v in os.environ.items() if k not in _UNSET}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trace = tmp_path / "trace.txt"
    monitor = ["strace", "-f", "-qq", "-xx", "-s", "600", "-e", "signal=none", "-o", str(trace)]
    monitor += ["-e", "trace=connect,sendto,sendmsg,sendmmsg"]
    spec = ROOT / "configs" / "search" / "tiny.yaml"
    args = ["search", "-c", str(spec), "--store", str(tiny_store), "--storage-path", str(tmp_path / "runs")]
    r = subprocess.run([*monitor, *cli_argv(*args)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "test once" in r.stdout  # the whole quick start ran: trials, final test, MLflow
    host = socket.gethostname().lower()
    own = {host, socket.getfqdn().lower(), host.split(".")[0], "localhost"}
    text = trace.read_text()
    assert "connect(" in text  # the trace saw Ray's own connections
    bad = outside_traffic(text, own)
    assert not bad, "\n".join(bad[:10])
