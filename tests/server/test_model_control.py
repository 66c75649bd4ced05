"""Triton's repository extension (server.modelcontrol): the index on both edges with the version
labels on HTTP, and load/unload through tritonclient with --model-control explicit (token
required), refused FAILED_PRECONDITION/403 without it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from digitserve.server.modelcontrol import REFUSED
from tests.servers import ServerThread, make_settings
from tests.support import require_module

TOKEN = "control-t0ken"

# tritonclient registers the same `inference.*` message names as our generated code, so it runs
# in a subprocess (see test_oip.py).
SCRIPT = r"""
import json, sys, time
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

grpc_url, http_url, token = sys.argv[1:]
headers = {"authorization": f"Bearer {token}"} if token else None
report = {}

def attempt(call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except InferenceServerException as exc:
        return ["error", str(exc.status()), exc.message()]

for edge, module, url in (("grpc", tg, grpc_url), ("http", th, http_url)):
    client = module.InferenceServerClient(url)
    steps = report[edge] = []
    index = (lambda **kw: client.get_model_repository_index(headers=headers, **kw)) if edge == "http" \
        else (lambda **kw: [dict(name=m.name, version=m.version, state=m.state, reason=m.reason)
                           for m in client.get_model_repository_index(headers=headers).models])
    steps.append(["index", index()])
    steps.append(["ready", client.is_model_ready("tiny", headers=headers)])
    steps.append(["unload", attempt(client.unload_model, "tiny", headers=headers)])
    time.sleep(1.5)  # several looks of discovery (--reload-interval 0.2): it must not serve it again
    steps.append(["ready", attempt(client.is_model_ready, "tiny", headers=headers)])
    steps.append(["load-missing", attempt(client.load_model, "nope", headers=headers)])
    steps.append(["load-refused", attempt(client.load_model, "broken", headers=headers)])
    steps.append(["load", attempt(client.load_model, "tiny", headers=headers)])
    steps.append(["ready", client.is_model_ready("tiny", headers=headers)])
    steps.append(["no-token", attempt(client.unload_model, "tiny")])
print(json.dumps(report))
"""


def run(server: ServerThread, token: str, tmp_path: Path) -> dict[str, list[list[object]]]:
    for module in ("tritonclient.grpc", "tritonclient.http", "geventhttpclient"):
        require_module(module, "it is in the dev extra: pip install -e '.[dev]'")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, server.target,
                           f"127.0.0.1:{server.app.http_port}", token],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, list[list[object]]] = json.loads(proc.stdout)
    return result


ENTRY = {"name": "tiny", "version": "1", "state": "READY", "reason": ""}


def test_tritonclient_unloads_and_loads_a_model_with_explicit_control(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    server = start_server(http_port=0, auth_token=TOKEN, model_control="explicit",
                          model_name=(), reload_interval=0.2)
    # A model whose only version the gate refuses (another model's files).
    shutil.copytree(server.app.settings.model_repo / "tiny" / "1",
                    server.app.settings.model_repo / "broken" / "1")
    report = run(server, TOKEN, tmp_path)
    not_found = {"grpc": "StatusCode.NOT_FOUND", "http": "404"}
    unauthenticated = {"grpc": ["error", "StatusCode.UNAUTHENTICATED"], "http": ["error", "401"]}
    for edge in ("grpc", "http"):
        steps = dict((step[0], step[1]) for step in report[edge][:2])
        # HTTP carries the version labels; Triton's gRPC ModelIndex has no field for them.
        index = [e for e in steps["index"] if e["name"] == "tiny"]  # "broken" may be listed too
        assert index == [{**ENTRY, "labels": []} if edge == "http" else ENTRY]
        names = [step[0] for step in report[edge]]
        assert names == ["index", "ready", "unload", "ready", "load-missing", "load-refused", "load",
                         "ready", "no-token"]
        values = [step[1] for step in report[edge]]
        assert values[1] is True
        assert values[2] is None or values[2] == {}, values  # unloaded
        # Unloaded: no longer served (NOT_FOUND over gRPC, False over HTTP, as for any unknown model).
        gone = "model 'tiny' is not served; this server serves "
        assert values[3] is False or (values[3][:2] == ["error", "StatusCode.NOT_FOUND"]
                                      and values[3][2].startswith(gone)), values[3]
        assert values[4][:2] == ["error", not_found[edge]], values[4]
        assert values[4][2].startswith("model 'nope' cannot be loaded: "), values[4]
        assert values[5][:2] == ["error", not_found[edge]], values[5]
        assert values[5][2].startswith("model 'broken' cannot be loaded: "), values[5]
        assert "/broken/1: metadata says 'tiny' version 1" in values[5][2], values[5]
        assert values[6] is None or values[6] == {}, values[6]
        assert values[7] is True
        assert values[8][:2] == unauthenticated[edge], values[8]
    # The server serves it still, after the last load, and discovery did not undo the unload
    # in between (reload interval 0.2 s).
    assert server.app.registry.models["tiny"].serving
    assert "broken" not in server.app.registry.models  # its failed load left it unserved


def test_load_and_unload_are_refused_while_model_control_is_off(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    server = start_server(http_port=0)
    report = run(server, "", tmp_path)
    for edge, status in (("grpc", "StatusCode.FAILED_PRECONDITION"), ("http", "403")):
        steps = dict((step[0], step[1]) for step in report[edge])
        assert steps["unload"] == ["error", status, REFUSED]
        assert steps["load"] == ["error", status, REFUSED]
        assert steps["ready"] is True
    assert server.app.registry.models["tiny"].serving


@pytest.mark.parametrize(("overrides", "message"), [
    ({}, "--model-control explicit lets callers load and unload models: set MNIST_AUTH_TOKEN or "
         "--auth-token-file too"),
    ({"auth_token": TOKEN, "workers": 2}, "--model-control explicit with --workers 2: a load or "
     "unload would reach one worker only; use one worker"),
])
def test_explicit_model_control_needs_a_token_and_one_worker(
    tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_settings(tmp_path, model_control="explicit", **overrides)
