"""A server without TensorFlow (issue 17: the slim `serve` image, the `serve` extra), in processes
where `import tensorflow` fails: it serves LiteRT flatbuffers, and refuses a version that only
TensorFlow could serve (no flatbuffer, or one that does not agree with the trainer's reference)
with a line naming what can serve it, keeps serving the rest, and never crashes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from digitserve.client.client import DigitClient
from digitserve.repository import ModelRepository
from tests.server.test_gate import publish_copy as publish_damaged
from tests.servers import ServerProcess
from tests.support import REPO_ROOT, publish_copy, wait_for

# What the serve image does not install: imports of them fail, and importlib finds none of them.
ABSENT = ("tensorflow", "keras", "sklearn", "matplotlib")
HINT = ("and TensorFlow is not installed here: serve it with the digitserve-train image (docker build "
        "--target train .), or an install of digitserve[server]")


@pytest.fixture
def slim_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a process without TensorFlow: a sitecustomize that marks the modules
    of ABSENT as not importable (None in sys.modules) before anything runs."""
    site = tmp_path / "no-tensorflow"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        f"import sys\nfor name in {ABSENT!r}:\n    sys.modules[name] = None\n")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=REPO_ROOT, timeout=60, check=False)
    assert done.returncode == 1 and "ModuleNotFoundError: import of tensorflow halted" in done.stderr
    return env


def no_flatbuffer(tiny_repo: Path, root: Path, version: int) -> Path:
    return publish_damaged(tiny_repo, root, version, remove=("model.tflite",))


def disagreeing_flatbuffer(tiny_repo: Path, root: Path, version: int) -> Path:
    """The trainer's reference probabilities no longer those of the flatbuffer (their classes
    reversed): LiteRT fails the agreement check, and TensorFlow would serve the Keras model."""
    def reverse(arrays: dict[str, np.ndarray]) -> None:
        arrays["reference"] = arrays["reference"][:, ::-1].copy()

    return publish_damaged(tiny_repo, root, version, check_set=reverse)


def test_a_server_without_tensorflow_serves_litert_and_refuses_what_needs_tensorflow(
    tiny_repo: Path, tmp_path: Path, spawn: type[ServerProcess], slim_env: dict[str, str]
) -> None:
    repo = tmp_path / "repo"
    publish_damaged(tiny_repo, repo, 1)
    missing = no_flatbuffer(tiny_repo, repo, 2)
    differing = disagreeing_flatbuffer(tiny_repo, repo, 3)
    # every model of the repository, as the serve image runs it
    server = spawn("--model-repo", str(repo), "--metrics-port", "-1", "--log-format", "text",
                   env=slim_env)
    with DigitClient(server.target(), timeout=30) as client:
        assert client.wait_until_serving(60) == "SERVING"
        wait_for(lambda: "refused model tiny version 2" in server.log, 30, "version 2's refusal")
        info = client.model_info()
        answer = client.predict(np.zeros((1, 784), dtype=np.uint8))
    assert info["version"] == 1 and info["inference_path"] == "litert"
    assert answer.model_version == 1
    refused = info["refused_versions"]
    assert refused["2"] == f"{missing}: LiteRT cannot serve it: model.tflite is missing, {HINT}"
    assert refused["3"].startswith(
        f"{differing}: LiteRT cannot serve it: model.tflite differs from the trainer's reference by ")
    assert refused["3"].endswith(f", {HINT}")
    assert server.proc.poll() is None
    assert "Traceback" not in server.log
    assert "tensorflow" not in Path(f"/proc/{server.proc.pid}/maps").read_text()


def test_a_server_without_tensorflow_whose_only_version_needs_it_waits_instead_of_crashing(
    tiny_repo: Path, tmp_path: Path, spawn: type[ServerProcess], slim_env: dict[str, str]
) -> None:
    repo = tmp_path / "repo"
    missing = no_flatbuffer(tiny_repo, repo, 1)
    server = spawn("--model-repo", str(repo), "--metrics-port", "-1", "--log-format", "text",
                   "--reload-interval", "0.2", env=slim_env)
    line = f"refused model tiny version 1: {missing}: LiteRT cannot serve it: model.tflite is missing, {HINT}"
    with DigitClient(server.target(), timeout=30) as client:
        wait_for(lambda: line in server.log, 60, "version 1's refusal")
        assert client.health() == "NOT_SERVING"
        assert server.proc.poll() is None
        # a version with its flatbuffer, published next, serves without a restart
        assert publish_copy(ModelRepository(repo), ModelRepository(tiny_repo).version_dir("tiny", 1)) == 2
        assert client.wait_until_serving(60) == "SERVING"
        assert client.predict(np.zeros((1, 784), dtype=np.uint8)).model_version == 2
    assert server.proc.poll() is None
    assert "Traceback" not in server.log


def test_inference_tensorflow_without_tensorflow_is_one_line(
    tiny_repo: Path, slim_env: dict[str, str]
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "digitserve.server", "--model-repo", str(tiny_repo), "--port", "0",
         "--inference", "tensorflow"],
        capture_output=True, text=True, env={**os.environ, **slim_env}, cwd=REPO_ROOT, timeout=60,
        check=False)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "mnist-serve: error: --inference tensorflow needs TensorFlow, which is not installed here: "
        "serve with --inference auto (LiteRT), or run mnist-serve in the digitserve-train image "
        "(docker build --target train .), or an install of digitserve[server]\n")
