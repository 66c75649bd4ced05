"""--scheduler-policy: every thread of a server process runs SCHED_BATCH by default (grpc's event
engine and poller, the event loop, the threads started later) and SCHED_OTHER when asked, read
from /proc; a kernel that refuses, or a platform without the call, is one warning and the
threads keep their policy."""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from digitserve.client.client import DigitClient
from digitserve.server import scheduling
from tests.servers import ServerProcess

POLICY_FIELD = 38  # /proc/PID/task/TID/stat field 41 (policy), counted after the ")" of the name


def thread_policies(pid: int) -> dict[str, int]:
    """Each thread's name and id -> its scheduling policy, as the kernel reports it."""
    policies = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:  # ended meanwhile
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        policies[f"{name} ({task.name})"] = int(stat.rsplit(")", 1)[1].split()[POLICY_FIELD])
    return policies


@pytest.mark.parametrize(("flags", "policy", "name"), [
    ((), os.SCHED_BATCH, "SCHED_BATCH"),
    (("--scheduler-policy", "normal"), os.SCHED_OTHER, "SCHED_OTHER")])
def test_every_thread_of_the_server_runs_the_policy(
    spawn: type[ServerProcess], tiny_repo: Path, flags: tuple[str, ...], policy: int, name: str
) -> None:
    server = spawn("--model-repo", str(tiny_repo), "--model-name", "tiny", "--reload-interval", "0",
                   "--inline-max-images", "0", *flags)  # every call through the model thread
    with DigitClient(server.target(), timeout=30) as client:
        assert client.wait_until_serving(60) == "SERVING"
        assert client.predict(np.zeros((2, 784), np.uint8)).probabilities.shape == (2, 10)
    policies = thread_policies(server.proc.pid)
    # the loop's, grpc's event engine and poller, the model thread started by the call, ...
    assert len(policies) >= 4, policies
    assert any(thread.startswith("event_engine") for thread in policies), policies
    assert {thread: p for thread, p in policies.items() if p != policy} == {}
    assert f"event loop uvloop {__import__('uvloop').__version__}, {name})" in server.log, server.log


def test_a_refusal_is_one_warning_and_the_threads_keep_their_policy(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []

    def refuse(tid: int, policy: int, param: os.sched_param) -> None:
        calls.append((tid, policy))
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    before = thread_policies(os.getpid())
    with caplog.at_level(logging.WARNING, "digitserve.server.scheduling"):
        scheduling.apply("batch")
    assert calls and calls[0][1] == os.SCHED_BATCH and len(calls) == 1  # stops at the first refusal
    assert [r.getMessage() for r in caplog.records] == [
        "--scheduler-policy batch: the kernel refused SCHED_BATCH (Operation not permitted); the "
        f"threads keep their policy ({scheduling.describe()})"]
    after = thread_policies(os.getpid())
    assert {t: after[t] for t in before.keys() & after.keys()} == \
        {t: before[t] for t in before.keys() & after.keys()}


def test_a_platform_without_the_call_is_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(os, "sched_setscheduler")
    with caplog.at_level(logging.WARNING, "digitserve.server.scheduling"):
        scheduling.apply("batch")
    assert [r.getMessage() for r in caplog.records] == [
        "--scheduler-policy batch: this platform has no SCHED_BATCH; the threads keep their policy"]


def test_apply_sets_every_running_thread_and_the_ones_started_later() -> None:
    """In a thread of its own test process, then put back: the policy of a thread running before
    the call changes too (grpc's threads may start before the server's first line)."""
    started, stop = threading.Event(), threading.Event()
    worker = threading.Thread(target=lambda: (started.set(), stop.wait(30)), daemon=True)
    worker.start()
    started.wait(10)
    try:
        scheduling.apply("batch")
        later = threading.Thread(target=stop.wait, args=(30,), daemon=True)
        later.start()
        policies = thread_policies(os.getpid())
        assert set(policies.values()) == {os.SCHED_BATCH}, policies
        assert scheduling.describe() == "SCHED_BATCH"
    finally:
        scheduling.apply("normal")
        stop.set()
    assert set(thread_policies(os.getpid()).values()) == {os.SCHED_OTHER}
    assert scheduling.describe() == "SCHED_OTHER"
