"""``make demo``'s script, .ci/demo.sh (issue 24, item 3): a taken port stops it in seconds with one
line before anything slow; a published model is reused unless MNIST_RETRAIN=1; it ends on the
accuracy line. Run against a venv of wrappers around this checkout's commands (nothing installed),
a ``make`` that refuses to install, and the tiny model, so no test downloads or trains for long."""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from digitserve.repository import ModelRepository
from tests.support import REPO_ROOT

SOURCES = ":".join(str(REPO_ROOT / part) for part in ("core", "protos", "server", "client", "trainer"))
ACCURACY = re.compile(
    r"model (\w+) v(\d+): 200 images, accuracy (\d+\.\d{4})%, mean cross-entropy \d+\.\d{4}")


def _script(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def tools(tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    """(environment, venv, log): ``make`` that runs only queries (-q) and logs anything else
    instead of installing; a venv whose commands run this checkout and log their arguments, whose
    ``mnist-train fetch`` does nothing (the data is the synthetic set)."""
    log = tmp_path / "calls.log"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    real_make = shutil.which("make")
    assert real_make, "make is not installed"
    _script(fake_bin / "make", f'echo "make $*" >>{log}\n'
                               f'[[ " $* " == *" -q "* ]] && exec {real_make} "$@"\nexit 1\n')
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    run = f'PYTHONPATH={SOURCES} exec {sys.executable}'
    _script(venv / "bin" / "python", f'{run} "$@"\n')
    _script(venv / "bin" / "mnist-serve", f'{run} -m digitserve.server "$@"\n')
    _script(venv / "bin" / "mnist-client", f'{run} -m digitserve.client "$@"\n')
    _script(venv / "bin" / "mnist-train", f'echo "mnist-train $*" >>{log}\n'
                                          f'[[ $1 == fetch ]] && exit 0\n{run} -m digitserve.trainer "$@"\n')
    (venv / "bin" / ".installed").touch()  # newer than pyproject.toml: `make -q` finds it up to date
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
    env.update(PATH=f"{fake_bin}:{env['PATH']}", VENV=str(venv), PYTHON=sys.executable,
               MNIST_OUT=str(tmp_path / "out"))
    return env, venv, log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_taken_port_stops_it_in_seconds_with_one_line(tools: tuple[dict[str, str], Path, Path]) -> None:
    env, _, log = tools
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run(["bash", ".ci/demo.sh"], cwd=REPO_ROOT, env=env | {"MNIST_PORT": str(port)},
                              capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
    assert (done.returncode, done.stdout) == (1, ""), done
    assert done.stderr == (f"make demo: port {port} on 127.0.0.1 is in use by another server (an earlier "
                           f"demo's?): stop it, or choose another with MNIST_PORT={port + 1} make demo\n")
    assert took < 30, f"{took:.1f}s"  # generous: it starts nothing but Python
    assert not log.exists(), log.read_text()  # neither make nor mnist-train ran


def test_a_bad_port_is_one_line(tools: tuple[dict[str, str], Path, Path]) -> None:
    env, _, log = tools
    done = subprocess.run(["bash", ".ci/demo.sh"], cwd=REPO_ROOT, env=env | {"MNIST_PORT": "5o051"},
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (1, ""), done
    assert done.stderr == "make demo: MNIST_PORT='5o051' is not a port number (1-65535)\n"
    assert not log.exists()


def _demo(env: dict[str, str], repo: Path, data: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = env | {"MNIST_PORT": str(_free_port()), "MNIST_MODEL_REPO": str(repo), "MNIST_MODEL_NAME": "tiny",
                 "MNIST_DATA": str(data), **extra}
    return subprocess.run(["bash", ".ci/demo.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_published_model_is_reused_and_it_ends_on_the_accuracy(
    tools: tuple[dict[str, str], Path, Path], tiny_repo: Path, synthetic_data_dir: Path, tmp_path: Path
) -> None:
    env, _, log = tools
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    done = _demo(env, repo, synthetic_data_dir)
    assert done.returncode == 0, done
    reused = f"== reuse tiny version 1 in {repo}/ (MNIST_RETRAIN=1 trains a new one)"
    assert reused in done.stdout, done.stdout
    last = done.stdout.splitlines()[-1]
    match = ACCURACY.fullmatch(last)
    assert match and match.group(1, 2, 3) == ("tiny", "1", "100.0000"), done.stdout
    calls = log.read_text().splitlines()
    assert [c.split()[:2] for c in calls] == [["make", "-s"], ["mnist-train", "fetch"]], calls
    assert ModelRepository(repo).versions("tiny") == [1]


def test_retrain_publishes_and_serves_a_new_version(
    tools: tuple[dict[str, str], Path, Path], tiny_repo: Path, synthetic_data_dir: Path, tmp_path: Path
) -> None:
    env, _, log = tools
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    done = _demo(env, repo, synthetic_data_dir, MNIST_RETRAIN="1", MNIST_PRESET="seed", MNIST_EPOCHS="2",
                 MNIST_BATCH_SIZE="16", MNIST_REPORT="0", MNIST_SEED="7")
    assert done.returncode == 0, done
    assert ModelRepository(repo).versions("tiny") == [1, 2]
    assert f"published tiny version 2: {repo}/tiny/2" in done.stdout, done.stdout
    match = ACCURACY.fullmatch(done.stdout.splitlines()[-1])
    assert match and match.group(1, 2) == ("tiny", "2"), done.stdout
    assert [c.split()[:2] for c in log.read_text().splitlines()][-1] == ["mnist-train", "train"]
