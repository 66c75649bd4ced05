"""--event-loop: a server process runs on uvloop by default and on asyncio's own loop when asked,
with the same answers on every edge and a drain on SIGTERM on both; uvloop asked for but missing is
one line and exit 2, and 'auto' falls back to asyncio. (Every other test runs the default: the
spawned servers and the in-process ServerThread alike.)"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from digitserve.client.client import DigitClient
from digitserve.oip import grpc_predict_v2_pb2 as oip
from digitserve.server.cli import main
from digitserve.server.eventloop import EventLoopError, chosen, describe, factory
from tests.servers import ServerProcess
from tests.support import REPO_ROOT, synthetic_digits, wait_for

MISSING = ("--event-loop uvloop: uvloop cannot be imported (import of uvloop halted; None in "
           "sys.modules); install it (pip install 'uvloop>=0.21'), or serve with --event-loop asyncio")


def test_auto_is_uvloop_where_it_imports_else_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvloop

    assert (chosen("auto"), chosen("uvloop"), chosen("asyncio")) == ("uvloop", "uvloop", "asyncio")
    for choice, kind, name in [("auto", uvloop.Loop, f"uvloop {uvloop.__version__}"),
                               ("asyncio", asyncio.BaseEventLoop, "asyncio")]:
        loop = factory(choice)()
        try:
            assert isinstance(loop, kind) and describe(loop) == name
            assert isinstance(loop, uvloop.Loop) == (choice == "auto")
            assert loop.run_until_complete(asyncio.sleep(0, "ran")) == "ran"
        finally:
            loop.close()
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    assert chosen("auto") == "asyncio"
    with pytest.raises(EventLoopError) as error:
        chosen("uvloop")
    assert str(error.value) == MISSING


def test_uvloop_asked_for_but_missing_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)
    assert main(["--model-repo", str(tmp_path), "--event-loop", "uvloop"]) == 2
    assert capsys.readouterr().err == f"mnist-serve: error: {MISSING}\n"
    with pytest.raises(SystemExit) as exit_info:
        main(["--model-repo", str(tmp_path), "--event-loop", "libuv"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith(
        "mnist-serve: error: argument --event-loop: invalid choice: 'libuv' (choose from 'auto', "
        "'uvloop', 'asyncio')\n")


def _answers(server: ServerProcess, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The probabilities of ``images`` over Predict, ModelInfer (gRPC) and the REST infer."""
    target = server.target()
    with DigitClient(target, timeout=30) as client:
        assert client.wait_until_serving(60) == "SERVING"
        predict = np.asarray(client.predict(images).probabilities, np.float32)
    rows = np.ascontiguousarray(images, "<f4") / 255
    request = oip.ModelInferRequest(model_name="tiny", raw_input_contents=[rows.tobytes()])
    request.inputs.add(name="images", datatype="FP32", shape=list(rows.shape))
    with grpc.insecure_channel(target) as channel:
        raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(
            request.SerializeToString(), timeout=30)
    response = oip.ModelInferResponse.FromString(raw)
    index = [o.name for o in response.outputs].index("probabilities")
    infer = np.frombuffer(response.raw_output_contents[index], "<f4").reshape(len(images), 10)
    match = wait_for(lambda: re.search(r"HTTP/JSON .* on http://127\.0\.0\.1:(\d+)/v2", server.log), 30,
                     "the HTTP port")
    body = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": list(rows.shape),
                                   "data": rows.ravel().tolist()}],
                       "outputs": [{"name": "probabilities"}]}).encode()
    post = urllib.request.Request(f"http://127.0.0.1:{match.group(1)}/v2/models/tiny/infer", body,
                                  {"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=30) as reply:
        (output,) = json.loads(reply.read())["outputs"]
    rest = np.asarray(output["data"], np.float32).reshape(len(images), 10)
    return predict, infer, rest


def test_both_loops_serve_the_same_answers_and_drain(
    spawn: type[ServerProcess], tiny_repo: Path, tmp_path: Path
) -> None:
    import uvloop

    images, _ = synthetic_digits(16, seed=11)
    answers = {}
    hidden = tmp_path / "hidden"  # 'auto' where uvloop does not import: asyncio's loop
    (hidden / "uvloop").mkdir(parents=True)
    (hidden / "uvloop" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    path = os.pathsep.join(filter(None, [str(hidden), os.environ.get("PYTHONPATH")]))
    for name, flags, env, loop in [
            ("default", [], {}, f"uvloop {uvloop.__version__}"),
            ("asyncio", ["--event-loop", "asyncio"], {}, "asyncio"),
            ("auto without uvloop", ["--event-loop", "auto"], {"PYTHONPATH": path}, "asyncio")]:
        server = spawn("--model-repo", str(tiny_repo), "--model-name", "tiny", "--http-port", "0",
                       "--reload-interval", "0", *flags, env=env)
        answers[name] = _answers(server, images)
        assert f"plaintext; event loop {loop}, SCHED_BATCH)" in server.log, server.log
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
        assert "stopped after draining" in server.log
    reference = answers["asyncio"][0]
    assert reference.shape == (16, 10) and np.allclose(reference.sum(axis=1), 1, atol=1e-5)
    # Not all alike: the model tells the images apart (a server answering a constant would not).
    assert len(set(reference.argmax(axis=1).tolist())) > 1
    for name, edges in answers.items():
        for edge, got in zip(("Predict", "ModelInfer", "REST"), edges, strict=True):
            np.testing.assert_allclose(got, reference, atol=1e-6, err_msg=f"{name}: {edge}")


def test_no_server_code_tests_for_asyncio_s_own_classes() -> None:
    """uvloop's transports, servers and loops implement asyncio's interfaces without subclassing
    its classes: an isinstance test against one (the HTTP edge's gate once asserted
    ``isinstance(transport, asyncio.Transport)``, and every connection was reset on uvloop) is
    false there."""
    classes = r"asyncio\.(Transport|BaseTransport|ReadTransport|WriteTransport|Server|AbstractServer|" \
              r"BaseEventLoop|SelectorEventLoop|AbstractEventLoop|Handle|TimerHandle)\b"
    pattern = re.compile(r"(isinstance|issubclass)\([^)]*" + classes)
    roots = [REPO_ROOT / "server", REPO_ROOT / "core"]
    found = [f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}"
             for root in roots for path in sorted(root.rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []
    assert pattern.search("assert isinstance(transport, asyncio.Transport)")  # the pattern finds one
