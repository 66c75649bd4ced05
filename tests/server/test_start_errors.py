"""A newcomer's start-up mistakes with ``mnist-serve`` (issue 14): a port that is taken (``--port``,
``--metrics-port``, with ``--workers`` too), a ``--model-repo`` that is missing, empty, another
model's or a model's own directory, a ``--model-version`` that is not published. Each is one line
(a JSON object in JSON mode: no traceback, no native grpc line) and exit 2, before the server
listens. An empty repository, one of other models only and a model without a version are waited
for since issue 15 (tests/server/test_first_version.py); their lines and exit 2 here are those of
``--exit-if-no-model``."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import REPO_ROOT


def serve(*args: str, log_format: str = "json", cwd: Path = REPO_ROOT) -> tuple[int, list[str]]:
    """``python -m digitserve.server ARGS``: its exit code and its stderr lines."""
    done = subprocess.run([sys.executable, "-m", "digitserve.server", "--log-format", log_format, *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stderr.splitlines()


def one_json_line(lines: list[str]) -> str:
    """The message of the only line, which is a JSON object of level ERROR."""
    assert len(lines) == 1, lines
    entry = json.loads(lines[0])
    assert entry["level"] == "ERROR" and entry["logger"] == "digitserve.server.app", entry
    return str(entry["message"])


def held_port(port: int = 0) -> socket.socket:
    """A socket listening on 127.0.0.1:``port`` (0: a free one), as another server's would."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


@pytest.fixture
def taken() -> Iterator[socket.socket]:
    with held_port() as sock:
        yield sock


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository the start-up check accepts (model 'tiny', version 1): the port is checked
    next, before any model is loaded."""
    (tmp_path / "repo" / "tiny" / "1").mkdir(parents=True)
    return tmp_path / "repo"


def in_use(flag: str, port: int) -> str:
    return (f"cannot start: {flag} {port}: 127.0.0.1:{port} is in use (another mnist-serve?); "
            f"choose another {flag}")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_port_is_one_json_line_and_exit_2(repo: Path, taken: socket.socket, workers: str) -> None:
    port = taken.getsockname()[1]
    code, lines = serve("--model-repo", str(repo), "--model-name", "tiny", "--port", str(port),
                        "--workers", workers)
    assert (code, one_json_line(lines)) == (2, in_use("--port", port))


def test_a_taken_port_in_text_mode_is_one_line_without_grpc_s_native_line(
    repo: Path, taken: socket.socket
) -> None:
    port = taken.getsockname()[1]
    code, lines = serve("--model-repo", str(repo), "--model-name", "tiny", "--port", str(port),
                        log_format="text")
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].endswith(f" ERROR digitserve.server.app {in_use('--port', port)}"), lines


def test_a_taken_metrics_port_is_one_line_and_exit_2(repo: Path, taken: socket.socket) -> None:
    port = taken.getsockname()[1]
    code, lines = serve("--model-repo", str(repo), "--model-name", "tiny", "--port", "0",
                        "--metrics-port", str(port))
    assert (code, one_json_line(lines)) == (2, in_use("--metrics-port", port))


def test_with_workers_a_taken_metrics_port_of_any_worker_is_one_line_and_exit_2(repo: Path) -> None:
    # Worker i serves its metrics on --metrics-port + i: worker 1's is taken.
    for _ in range(20):
        with held_port() as probe:
            first = probe.getsockname()[1] - 1
        try:
            worker_1 = held_port(first + 1)
        except OSError:
            continue
        with worker_1, socket.socket() as free:
            try:
                free.bind(("127.0.0.1", first))
            except OSError:
                continue
            free.close()
            code, lines = serve("--model-repo", str(repo), "--model-name", "tiny", "--port", "0",
                                "--workers", "2", "--metrics-port", str(first))
        break
    else:
        pytest.fail("found no free port beside a port it could hold")
    assert code == 2
    assert one_json_line(lines) == (
        f"cannot start: --metrics-port {first}: 127.0.0.1:{first + 1} (worker 1's, --metrics-port + 1) "
        "is in use (another mnist-serve?); choose another --metrics-port")


def test_a_missing_repository_is_one_line_naming_it(tmp_path: Path) -> None:
    code, lines = serve("--model-repo", str(tmp_path / "missing"))
    assert code == 2
    assert one_json_line(lines) == (
        f"cannot start: --model-repo {tmp_path / 'missing'}: no such directory; give the model "
        "repository the trainer publishes to, or publish into it (mnist-train train --model-repo "
        f"{tmp_path / 'missing'} --model-name NAME)")


def test_a_missing_relative_repository_says_where_it_was_looked_for(tmp_path: Path) -> None:
    code, lines = serve("--model-repo", "missing/", "--workers", "2", cwd=tmp_path)
    assert code == 2
    assert one_json_line(lines) == (
        f"cannot start: --model-repo missing: no such directory ({tmp_path / 'missing'}); give the "
        "model repository the trainer publishes to, or publish into it (mnist-train train "
        "--model-repo missing --model-name NAME)")


def test_an_empty_repository_says_so(tmp_path: Path) -> None:
    code, lines = serve("--model-repo", str(tmp_path), "--exit-if-no-model")
    assert code == 2
    assert one_json_line(lines) == (
        f"cannot start: --model-repo {tmp_path}: the directory is empty: no model is published "
        f"there yet; publish one (mnist-train train --model-repo {tmp_path} --model-name NAME)")
    code, lines = serve("--model-repo", str(tmp_path), "--model-name", "mnist", "--exit-if-no-model")
    assert code == 2
    assert one_json_line(lines) == (
        f"cannot start: --model-repo {tmp_path}: the directory is empty: no model is published "
        f"there yet; publish one (mnist-train train --model-repo {tmp_path} --model-name mnist)")


def publish_stub(model_dir: Path, *versions: int) -> None:
    """Version directories holding a metadata.json, as published versions do (enough for a
    listing; nothing is loaded)."""
    for version in versions:
        (model_dir / str(version)).mkdir(parents=True)
        (model_dir / str(version) / "metadata.json").write_text("{}")


def test_a_model_directory_given_as_the_repository_gets_the_repository_to_use(tmp_path: Path) -> None:
    publish_stub(tmp_path / "models" / "mnist", 1, 2)
    code, lines = serve("--model-repo", str(tmp_path / "models" / "mnist"))
    assert code == 2
    assert one_json_line(lines) == (
        f"cannot start: --model-repo {tmp_path}/models/mnist looks like the directory of model "
        f"'mnist' (it holds versions 1, 2 of it), not a repository of models: use --model-repo "
        f"{tmp_path}/models")
    code, lines = serve("--model-repo", "models/mnist", "--model-name", "digits", log_format="text",
                        cwd=tmp_path)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].endswith(
        "cannot start: --model-repo models/mnist looks like the directory of model 'mnist' (it "
        "holds versions 1, 2 of it), not a repository of models: use --model-repo models "
        "--model-name mnist"), lines


def test_a_repository_without_the_model_lists_the_models_and_versions_there(tmp_path: Path) -> None:
    publish_stub(tmp_path / "digits", 1, 2)
    publish_stub(tmp_path / "tiny", 1)
    code, lines = serve("--model-repo", str(tmp_path), "--model-name", "mnist", "--exit-if-no-model")
    assert code == 2
    assert one_json_line(lines) == (
        f"cannot start: --model-repo {tmp_path}: no model 'mnist' in it; models there: digits "
        "(versions 1, 2), tiny (version 1); choose one with --model-name, or publish 'mnist' "
        f"(mnist-train train --model-repo {tmp_path} --model-name mnist)")


def test_a_model_without_a_version_says_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "mnist").mkdir()
    code, lines = serve("--model-repo", str(tmp_path), "--exit-if-no-model")
    assert code == 2
    assert one_json_line(lines) == (
        f"cannot start: --model-repo {tmp_path}: model 'mnist' has no published version in "
        f"{tmp_path} ({tmp_path / 'mnist'} holds no version directory 1, 2, …); publish one "
        f"(mnist-train train --model-repo {tmp_path} --model-name mnist)")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_pinned_version_that_is_not_published_lists_those_that_are(tmp_path: Path, workers: str) -> None:
    publish_stub(tmp_path / "mnist", 1, 2, 3)
    code, lines = serve("--model-repo", str(tmp_path), "--model-name", "mnist", "--model-version", "5",
                        "--workers", workers)
    assert code == 2
    assert one_json_line(lines) == (
        f"cannot start: --model-version 5: model 'mnist' has no version 5 in {tmp_path} (published: "
        "versions 1, 2, 3); pin one of those, or 0 for the newest")


@pytest.mark.parametrize("where", ["flag", "file"])
def test_a_specific_version_policy_with_none_of_its_versions_published_lists_those_that_are(
        tmp_path: Path, where: str) -> None:
    publish_stub(tmp_path / "mnist", 1, 2, 3)
    config = tmp_path / "models.toml"
    config.write_text("[models.mnist]\nversion_policy = { specific = { versions = [6, 5] } }\n")
    how = (["--model-name", "mnist", "--version-policy", "specific:5,6"] if where == "flag"
           else ["--model-config", str(config)])
    code, lines = serve("--model-repo", str(tmp_path), *how)
    assert code == 2
    assert one_json_line(lines) == (
        f"cannot start: version policy specific:5,6: model 'mnist' has none of these versions in "
        f"{tmp_path} (published: versions 1, 2, 3); list published ones, or serve the newest (latest:N)")
