"""A newcomer's mistakes with the client (issue 14) each get one clear line, fast: nothing listening
at the target, images in an unexpected shape or dtype, an unknown health service, `info` read by a
person or a machine, `--plot` without matplotlib, abbreviated options. Each runs the real command
(``main`` or a subprocess) or the real library call against a real server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from digitserve.client import ConnectError, DigitClient, DigitServeError, ImageError
from digitserve.client.cli import main
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc
from tests.servers import ServerThread
from tests.support import REPO_ROOT, FakeModel

# The bound: connection refused reported in < 3 s without --wait (it took 10 s).
FAST = 3.0


def refused_line(target: str) -> str:
    return f"cannot connect to {target}: connection refused (is mnist-serve running?)"


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def run_cli(*args: str, env: dict[str, str] | None = None,
            prelude: str = "") -> tuple[subprocess.CompletedProcess[str], float]:
    """``mnist-client ARGS`` as a process (``python -m digitserve.client``, the console script's
    code); ``prelude`` runs first in it. Returns the result and its wall time."""
    code = f"{prelude}\nimport runpy, sys\nsys.argv[0] = 'mnist-client'\n" \
           "runpy.run_module('digitserve.client', run_name='__main__')"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})
    return proc, time.monotonic() - started


def startup_seconds() -> float:
    """What this machine takes to start the client at all (imports included): the part of a
    subprocess's time that is not the client's doing."""
    _, elapsed = run_cli("--help")
    return elapsed


# --- 1. nothing listening ------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["predict", "--data-dir", "DATA", "--index", "0"], ["info"],
                                     ["evaluate", "--data-dir", "DATA"], ["health"],
                                     ["loadtest", "--data-dir", "DATA", "--duration", "1"]],
                         ids=["predict", "info", "evaluate", "health", "loadtest"])
def test_nothing_listening_is_one_line_at_once(
        command: list[str], closed_port: int, synthetic_data_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    target = f"127.0.0.1:{closed_port}"
    argv = [str(synthetic_data_dir) if word == "DATA" else word for word in command]
    started = time.monotonic()
    code = main(["--target", target, *argv])
    elapsed = time.monotonic() - started
    captured = capsys.readouterr()
    assert (code, captured.err) == (1, f"mnist-client: error: {refused_line(target)}\n")
    assert captured.out == ""
    assert elapsed < FAST, f"{elapsed:.1f} s to report a refused connection"


def test_nothing_listening_as_a_real_process(closed_port: int, synthetic_data_dir: Path) -> None:
    baseline = startup_seconds()
    target = f"127.0.0.1:{closed_port}"
    proc, elapsed = run_cli("--target", target, "predict", "--data-dir", str(synthetic_data_dir))
    assert (proc.returncode, proc.stderr, proc.stdout) == (
        1, f"mnist-client: error: {refused_line(target)}\n", "")
    assert elapsed - baseline < FAST, f"{elapsed:.1f} s (start-up {baseline:.1f} s)"


def test_the_library_raises_connect_error_at_once(closed_port: int) -> None:
    target = f"127.0.0.1:{closed_port}"
    calls: list[Callable[[DigitClient], object]] = [
        lambda c: c.predict(np.zeros(784, np.uint8)),
        lambda c: c.predict(np.zeros((2, 28, 28), np.uint8)),
        lambda c: c.model_info(),
        lambda c: c.health(),
        lambda c: c.evaluate(np.zeros((2, 784), np.uint8), [0, 1]),
    ]
    for call in calls:
        with DigitClient(target) as client:
            started = time.monotonic()
            with pytest.raises(ConnectError) as info:
                call(client)
            elapsed = time.monotonic() - started
        error = info.value
        assert str(error) == error.details() == refused_line(target)
        assert isinstance(error, DigitServeError) and error.code() == grpc.StatusCode.UNAVAILABLE
        assert (error.target, error.reason) == (target, "connection refused (is mnist-serve running?)")
        assert elapsed < FAST, f"{elapsed:.1f} s"


def test_wait_gives_up_with_one_line(closed_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    target = f"127.0.0.1:{closed_port}"
    started = time.monotonic()
    assert main(["--target", target, "--wait", "1.5", "info"]) == 1
    elapsed = time.monotonic() - started
    assert capsys.readouterr().err == (f"mnist-client: error: cannot connect to {target} within "
                                       "1.5 s: connection refused (is mnist-serve running?)\n")
    assert 1.5 <= elapsed < 1.5 + FAST
    assert main(["--target", target, "health", "--wait", "1"]) == 1  # health's own --wait
    assert capsys.readouterr().err == (f"mnist-client: error: cannot connect to {target} within "
                                       "1 s: connection refused (is mnist-serve running?)\n")


def test_wait_waits_for_a_server_that_starts_later(
        closed_port: int, start_server: Callable[..., ServerThread]) -> None:
    """The CLI with --wait (a process) and the library with wait_for_ready=True both wait, then
    succeed once a server listens on the port."""
    target = f"127.0.0.1:{closed_port}"
    answers: list[object] = []

    def library_call() -> None:
        with DigitClient(target, wait_for_ready=True, timeout=60) as client:
            try:
                answers.append(client.predict(np.zeros((28, 28), np.uint8)).model_name)
            except Exception as exc:  # reported by the assertion below
                answers.append(exc)

    waiter = threading.Thread(target=library_call, daemon=True)
    waiter.start()
    started = time.monotonic()
    cli = subprocess.Popen(
        [sys.executable, "-m", "digitserve.client", "--target", target, "--wait", "60", "info"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)  # both are waiting by now: nothing listens yet
        assert cli.poll() is None and waiter.is_alive() and not answers
        start_server(port=closed_port)
        out, err = cli.communicate(timeout=60)
        waiter.join(60)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert (cli.returncode, err) == (0, "")
    assert out.splitlines()[0] == "model:            tiny version 1"
    assert time.monotonic() - started >= 2
    assert answers == ["tiny"]


# --- 2. images as a caller has them ----------------------------------------------------------------

def test_predict_takes_images_as_the_cli_does(fake_server: ServerThread) -> None:
    """28×28 or 784 per image, batches, any integer dtype, lists, floats 0..1 and 0..255: the same
    probabilities as the canonical uint8 (N, 784) form."""
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    forms: dict[str, Any] = {
        "one 28x28": images[0],
        "one 784": images[0].reshape(784),
        "N x 28 x 28": images,
        "N x 784": images.reshape(3, 784),
        "int64": images.astype(np.int64),
        "int32 28x28": images[0].astype(np.int32),
        "uint16": images.astype(np.uint16),
        "list 28x28": images[0].tolist(),
        "list N x 784": images.reshape(3, 784).tolist(),
        "floats 0..1": images.astype(np.float64) / 255,
        "floats 0..1 as list": (images[0].astype(np.float64) / 255).tolist(),
        "floats 0..255": images.astype(np.float32),
        "floats 0..255 float64 784": images[0].reshape(784).astype(np.float64),
    }
    with DigitClient(fake_server.target) as client:
        canonical = client.predict(images.reshape(3, 784)).probabilities
        for name, form in forms.items():
            got = client.predict(form).probabilities
            np.testing.assert_array_equal(got, canonical[: got.shape[0]], err_msg=name)
            assert got.shape[0] == (3 if np.ndim(form) == 3 or np.shape(form)[0] == 3 else 1), name


@pytest.mark.parametrize(("images", "message"), [
    (np.zeros((28, 27), np.uint8),
     "images of shape 28×27: expected one image (28×28 or 784 values) or a batch (N×28×28 or N×784)"),
    (np.zeros(783, np.uint8),
     "images of shape 783: expected one image (28×28 or 784 values) or a batch (N×28×28 or N×784)"),
    (np.zeros((2, 28, 28, 1), np.uint8),
     "images of shape 2×28×28×1: expected one image (28×28 or 784 values) or a batch (N×28×28 or "
     "N×784)"),
    (np.full(784, -1, np.int64),
     "images (int64): values -1..-1 are outside 0..255; integer pixels are intensities 0..255"),
    (np.arange(784) % 300,
     "images (int64): values 0..299 are outside 0..255; integer pixels are intensities 0..255"),
    (np.full(784, 300.0),
     "images (float64): values 300..300 are outside 0..1 and 0..255; float pixels are intensities "
     "in 0..1 (or 0..255)"),
    (np.full(784, -0.5, np.float32),
     "images (float32): values -0.5..-0.5 are outside 0..1 and 0..255; float pixels are "
     "intensities in 0..1 (or 0..255)"),
    (np.full(784, np.nan), "images (float64): hold NaN or infinite values"),
    (np.zeros(784, bool), "images: booleans are not pixels; expected integers 0..255 or floats in "
     "0..1 or 0..255"),
    (["0"] * 784, "images: strings are not pixels; expected integers 0..255 or floats in 0..1 or "
     "0..255"),
    ([[0] * 784, [0] * 783], None),  # ragged: numpy's own words follow
    (np.zeros((0, 784), np.uint8), "images: no pixels (shape (0, 784))"),
], ids=["28x27", "783", "channel-axis", "negative", "int-over-255", "float-over-255",
        "float-negative", "nan", "bool", "strings", "ragged", "empty"])
def test_predict_refuses_other_images_in_the_callers_terms(
        fake_server: ServerThread, images: Any, message: str | None) -> None:
    model = fake_server.model
    assert isinstance(model, FakeModel)
    calls = len(model.calls)
    with DigitClient(fake_server.target) as client, pytest.raises(ImageError) as info:
        client.predict(images)
    if message is None:
        assert str(info.value).startswith("images: not a rectangular array of numbers (")
    else:
        assert str(info.value) == message
    assert isinstance(info.value, ValueError)
    assert len(model.calls) == calls  # refused before anything was sent


# --- 3. an unknown health service ----------------------------------------------------------------

KNOWN = ("'', digitserve.v1.DigitService, digitserve.v1.Model/fake, digitserve.v1.ModelUpdates, "
         "digitserve.v1.ModelUpdates/fake")


def test_an_unknown_health_service_names_the_known_ones(
        fake_server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", fake_server.target, "health", "--service", "nope"]) == 1
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == (
        "", f"mnist-client: error: no such health service 'nope' (known: {KNOWN})\n")
    # The server's answer itself, for grpcurl and other clients.
    with grpc.insecure_channel(fake_server.target) as channel, pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == f"no such health service 'nope' (known: {KNOWN})"
    # Known ones still answer.
    assert main(["--target", fake_server.target, "health", "--service",
                 "digitserve.v1.DigitService"]) == 0
    assert capsys.readouterr().out == "SERVING\n"


# --- 4. info for people and for machines ---------------------------------------------------------

def test_info_is_readable_text_with_everything_get_model_info_says(
        fake_server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", fake_server.target, "info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    with grpc.insecure_channel(fake_server.target) as channel:  # the versions' states as listed
        listed = pb_grpc.DigitServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
    states = ", ".join(f"{v.version} {pb.VersionState.Name(v.state).removeprefix('VERSION_STATE_')}"
                       for v in listed.models[0].versions)
    assert states.startswith("1 SERVING")
    assert lines == [
        "model:            fake version 1",
        "inference path:   fake",
        "preset:           fake",
        "test accuracy:    50.0000% (at training)",
        "input:            28×28 pixels (784 per image); float pixel = byte × 1/255",
        "labels:           0 1 2 3 4 5 6 7 8 9",
        "created at:       2026-01-01T00:00:00Z",
        "max images:       1024 per Predict request or Evaluate message",
        "loaded versions:  1 (newest first; --model-version pins one)",
        "refused versions: none",
        "model state:      SERVING, default version 1",  # ListModels's, from here on
        "version labels:   none",
        "canary weight:    none",
        f"versions:         {states}",
        "metadata.json:    in full with --json",
    ]


def test_info_json_is_the_response(fake_server: ServerThread,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", fake_server.target, "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    with grpc.insecure_channel(fake_server.target) as channel:
        response = pb_grpc.DigitServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(),
                                                                  timeout=10)
    fields = [f.name for f in pb.GetModelInfoResponse.DESCRIPTOR.fields]
    assert list(info) == [("metadata" if f == "metadata_json" else f) for f in fields]
    assert info["metadata"] == json.loads(response.metadata_json)
    for field in fields:
        if field == "metadata_json":
            continue
        value = getattr(response, field)
        expected = [{"version": r.version, "reason": r.reason} for r in value] if field == \
            "refused_versions" else list(value) if not isinstance(value, str | int | float) \
            else value
        assert info[field] == expected, field
    assert info["model_version"] == 1 and isinstance(info["model_version"], int)
    assert info["inference_path"] == "fake" and info["loaded_versions"] == [1]


# --- 5. --plot without matplotlib ----------------------------------------------------------------

def test_plot_without_matplotlib_is_refused_before_any_work(
        fake_server: ServerThread, synthetic_data_dir: Path, tmp_path: Path) -> None:
    model = fake_server.model
    assert isinstance(model, FakeModel)
    calls = len(model.calls)
    block = "import sys; sys.modules['matplotlib'] = None  # matplotlib is not installed"
    for command in (["evaluate", "--data-dir", str(synthetic_data_dir)],
                    ["loadtest", "--data-dir", str(synthetic_data_dir), "--requests", "5"]):
        proc, _ = run_cli("--target", fake_server.target, *command, "--plot",
                          str(tmp_path / "x.png"), prelude=block)
        assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
        assert proc.stderr == (
            "mnist-client: error: --plot needs the 'plot' extra, which is not installed (missing: "
            "matplotlib); install it with: pip install 'digitserve[plot]' (from a checkout: pip "
            "install -e '.[plot]')\n")
    assert len(model.calls) == calls  # nothing was evaluated
    assert not (tmp_path / "x.png").exists()


# --- 6. abbreviations ----------------------------------------------------------------------------

@pytest.mark.parametrize(("module", "argv", "last_line"), [
    ("digitserve.client", ["--targ", "127.0.0.1:1", "health"],
     "mnist-client: error: unrecognized arguments: --targ (abbreviations are not accepted: did you "
     "mean --target?)"),
    ("digitserve.client", ["--target", "127.0.0.1:1", "predict", "--data-dir", "d", "--ind", "3"],
     "mnist-client: error: unrecognized arguments: --ind 3 (abbreviations are not accepted: did "
     "you mean --index?)"),
    ("digitserve.trainer", ["train", "--data-dir", "d", "--model-repo", "r", "--model-name", "m",
                            "--pre", "seed"],
     "mnist-train: error: unrecognized arguments: --pre seed (abbreviations are not accepted: did "
     "you mean --preset?)"),
    ("digitserve.server", ["--model-repo", "r", "--model-nam", "x"],
     "mnist-serve: error: unrecognized arguments: --model-nam and 1 value (not shown: values may "
     "be secrets)"),
], ids=["client-top", "client-sub", "train", "serve"])
def test_abbreviations_are_refused_by_every_command(
        module: str, argv: list[str], last_line: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
    proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == last_line
    assert proc.stderr.startswith("usage: ") and "Traceback" not in proc.stderr
