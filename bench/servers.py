"""Server processes under benchmark: start, time to SERVING (cold start), resident memory of the
process tree from /proc, stop."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from digitserve.metadata import METADATA_FILE, Metadata
from digitserve.oip import grpc_predict_v2_pb2 as oip
from digitserve.oip import grpc_predict_v2_pb2_grpc as oip_grpc


class BenchError(Exception):
    """Raised when a benchmark cannot go on: a server that exits or never reports SERVING, a
    model that cannot be found or trained, a tool that fails."""


def free_port() -> int:
    """A port free right now on 127.0.0.1 (the servers under test are told to bind it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServerSpec:
    """How to start one server and what to call it in the table. ``ready_line`` (a regex) must
    appear ``ready_count`` times in its log before it counts as started (all workers loaded).
    ``protocol``: what the load tester sends it (digitserve.loadtest.PROTOCOLS). ``ready_probe``:
    ``health`` (gRPC health says SERVING) or ``oip`` (the Open Inference Protocol's ServerReady and
    ModelReady of ``model_name``, for servers without gRPC health)."""

    name: str
    kind: str  # null, naive, ours, ours-oip, kserve or kserve-litert
    argv: list[str]
    model: str = "–"
    workers: int = 1
    ready_line: str | None = None
    ready_count: int = 0
    env: dict[str, str] = field(default_factory=dict)
    protocol: str = "digitserve"
    ready_probe: str = "health"
    model_name: str = "mnist"
    evaluates: bool = True  # serves digitserve.v1 Evaluate


def _health(channel: grpc.Channel) -> str:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
    except grpc.RpcError:
        return "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def _oip_ready(channel: grpc.Channel, model_name: str) -> str:
    """SERVING when a V2 server says it and the model are ready (the V2 protocol has no health
    service of gRPC's kind)."""
    stub = oip_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
    try:
        server = stub.ServerReady(oip.ServerReadyRequest(), timeout=1.0)
        model = stub.ModelReady(oip.ModelReadyRequest(name=model_name), timeout=1.0)
    except grpc.RpcError:
        return "UNREACHABLE"
    return "SERVING" if server.ready and model.ready else "NOT_SERVING"


class RunningServer:
    """A started server process; ``cold_start_s`` is process start to SERVING (every worker)."""

    def __init__(self, spec: ServerSpec, port: int, log_path: Path) -> None:
        self.spec = spec
        self.port = port
        self.target = f"127.0.0.1:{port}"
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(spec.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **spec.env})
        self.cold_start_s = float("nan")

    def log_tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def wait_serving(self, timeout: float) -> float:
        """Polls health until SERVING (and, for several workers, until each logged its ready line);
        returns and records the seconds since the process started."""
        deadline = self.started + timeout
        with grpc.insecure_channel(self.target) as channel:
            while True:
                if self.proc.poll() is not None:
                    raise BenchError(f"{self.spec.name} exited with {self.proc.returncode}:\n"
                                     f"{self.log_tail()}")
                status = (_oip_ready(channel, self.spec.model_name)
                          if self.spec.ready_probe == "oip" else _health(channel))
                if status == "SERVING" and self._all_ready():
                    self.cold_start_s = time.monotonic() - self.started
                    return self.cold_start_s
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.spec.name} not SERVING after {timeout:g}s:\n"
                                     f"{self.log_tail()}")
                time.sleep(0.02)

    def _all_ready(self) -> bool:
        if not self.spec.ready_line or self.spec.ready_count <= 1:
            return True
        text = self.log_path.read_text(errors="replace")
        return len(re.findall(self.spec.ready_line, text)) >= self.spec.ready_count

    def memory(self) -> list[tuple[str, float]]:
        """(short command, VmRSS in MiB) of the server process and all its descendants."""
        return [(_command(pid), rss) for pid in _tree(self.proc.pid)
                if (rss := _rss_mib(pid)) is not None]

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _tree(pid: int) -> list[int]:
    children = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(sorted(children.get(p, [])))
    return out


def _rss_mib(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def _command(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    line = " ".join(words)
    if "resource_tracker" in line:
        return "resource tracker"
    if "spawn_main" in line:
        return "worker"
    if "-m" in words[:-1]:
        return words[words.index("-m") + 1]
    return Path(words[0]).name if words else "?"


def model_versions(repo: Path, name: str) -> dict[str, int]:
    """The newest version of each preset found in REPO/NAME/*/metadata.json."""
    found: dict[str, int] = {}
    root = repo / name
    if not root.is_dir():
        return found
    for child in root.iterdir():
        if not child.name.isdigit() or not (child / METADATA_FILE).is_file():
            continue
        metadata = Metadata.from_json(json.loads((child / METADATA_FILE).read_text()),
                                      child / METADATA_FILE)
        preset = metadata.preset or ""
        found[preset] = max(found.get(preset, 0), int(child.name))
    return found


def write_section(doc: Path, begin: str, end: str, command: str, text: str) -> None:
    """Puts ``text`` between the markers ``begin`` and ``end`` of ``doc`` (BENCHMARKS.md), under a
    line naming when and by which ``command`` it was measured; appends the section the first time."""
    old = doc.read_text()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    section = f"{begin}\n\nRun of {when}: `{command}`\n\n{text}\n\n{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + section + old[old.index(end) + len(end):]
    else:
        new = old + "\n" + section + "\n"
    doc.write_text(new)
