"""The client side of the model repository server (issue 15): ``--model-name`` and ``--label`` on
every command that calls a model (flags and MNIST_CLIENT_* variables), the ``models`` sub-command
and what ``info`` shows of the repository, the library's ``model_name``/``label`` and
``list_models``; against a stand-in of a server older than ListModels, each as one line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from digitserve.client import DigitClient, UnimplementedError
from digitserve.client.cli import build_parser, format_models, info_json, main
from digitserve.client.messages import message_dict
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc


def repository() -> pb.ListModelsResponse:
    """A repository state as ListModels gives it: a model with a canary split and a refused
    version, a model still waiting for its first version, and a model config file."""
    response = pb.ListModelsResponse(default_model="mnist", config_path="models/models.yaml")
    mnist = response.models.add(name="mnist", state=pb.MODEL_STATE_SERVING, default_version=3,
                                canary_weight=0.1)
    mnist.labels["stable"] = 3
    mnist.labels["canary"] = 12
    mnist.versions.add(version=12, state=pb.VERSION_STATE_SERVING, labels=["canary"])
    mnist.versions.add(version=3, state=pb.VERSION_STATE_SERVING, labels=["stable"])
    mnist.versions.add(version=2, state=pb.VERSION_STATE_AVAILABLE)
    mnist.versions.add(version=1, state=pb.VERSION_STATE_REFUSED,
                       reason="check-set accuracy 0.1800 is below the floor 0.9000 set by "
                       "--min-check-accuracy")
    response.models.add(name="digits", state=pb.MODEL_STATE_LOADING,
                        reason="no version of 'digits' is published yet")
    return response


def test_models_table() -> None:
    assert format_models(repository()).splitlines() == [
        "MODEL   STATE    DEFAULT  LABELS                   CANARY",
        "mnist   SERVING  3        canary → 12, stable → 3  10.0 %",
        "  version 12  SERVING    canary",
        "  version  3  SERVING    stable",
        "  version  2  AVAILABLE",
        "  version  1  REFUSED    check-set accuracy 0.1800 is below the floor 0.9000 set by "
        "--min-check-accuracy",
        "digits  LOADING  –        –                        –",
        "  reason: no version of 'digits' is published yet",
        "default model: mnist",
        "model config:  models/models.yaml",
    ]
    empty = pb.ListModelsResponse(config_path="m.yaml", config_error="line 3: 'canary_weight' "
                                  "1.5 is not in [0, 1]")
    assert format_models(empty).splitlines() == [
        "MODEL  STATE  DEFAULT  LABELS  CANARY",
        "(no models: none is published in the repository yet)",
        "default model: none (requests must name one: --model-name)",
        "model config:  m.yaml (its last change was not applied: line 3: 'canary_weight' 1.5 is "
        "not in [0, 1])",
    ]


def test_list_models_as_json_values() -> None:
    out = message_dict(repository())
    assert out["default_model"] == "mnist" and out["config_error"] == ""
    mnist, digits = out["models"]
    assert mnist["labels"] == {"canary": 12, "stable": 3}  # a map: an object of label -> version
    assert mnist["state"] == "MODEL_STATE_SERVING" and digits["state"] == "MODEL_STATE_LOADING"
    assert mnist["versions"][0] == {"version": 12, "state": "VERSION_STATE_SERVING", "reason": "",
                                    "labels": ["canary"]}
    assert isinstance(mnist["default_version"], int) and mnist["canary_weight"] == 0.1
    assert list(mnist) == [f.name for f in pb.ModelStatus.DESCRIPTOR.fields]
    assert json.loads(json.dumps(out)) == out
    # An enum value newer than this client: its number.
    newer = pb.ModelStatus(name="x")
    newer.state = 7  # type: ignore[assignment]
    assert message_dict(newer)["state"] == 7
    # info --json: the same mapping, with metadata_json parsed (and the new version_labels).
    info = info_json(pb.GetModelInfoResponse(model_name="m", metadata_json='{"a": 1}',
                                             version_labels=["stable"]))
    assert info["metadata"] == {"a": 1} and info["version_labels"] == ["stable"]


COMMANDS = {
    "predict": ["predict", "--data-dir", "d"],
    "evaluate": ["evaluate", "--data-dir", "d"],
    "info": ["info"],
    "loadtest": ["loadtest", "--data-dir", "d"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_model_command_takes_a_model_and_a_label(command: str) -> None:
    argv = COMMANDS[command]
    args = build_parser({}).parse_args([*argv, "--model-name", "digits", "--label", "canary"])
    assert (args.model_name, args.label, args.model_version) == ("digits", "canary", 0)
    args = build_parser({}).parse_args(argv)
    assert (args.model_name, args.label, args.model_version) == ("", "", 0)
    # The client's own variables; MNIST_MODEL_NAME is the trainer's and the server's (the image
    # sets it for every command), so a client in that image still asks the server's default.
    env = {"MNIST_CLIENT_MODEL_NAME": "digits", "MNIST_CLIENT_LABEL": "stable",
           "MNIST_MODEL_NAME": "mnist"}
    args = build_parser(env).parse_args(argv)
    assert (args.model_name, args.label) == ("digits", "stable")
    args = build_parser({"MNIST_MODEL_NAME": "mnist"}).parse_args(argv)
    assert args.model_name == ""
    # A flag wins over the variable of the other member of its group.
    args = build_parser({"MNIST_CLIENT_LABEL": "stable"}).parse_args([*argv, "--model-version", "2"])
    assert (args.label, args.model_version) == ("", 2)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_version_and_a_label_together_are_a_usage_error(
        command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--target", "127.0.0.1:1", *COMMANDS[command], "--model-version", "3", "--label",
              "canary"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"mnist-client {command}: error: argument --label: not allowed "
                                    "with argument --model-version")
    assert err.startswith("usage: ")


def test_models_takes_a_model_name_and_json() -> None:
    args = build_parser({}).parse_args(["models"])
    assert (args.command, args.model_name, args.json) == ("models", "", False)
    args = build_parser({"MNIST_CLIENT_MODEL_NAME": "digits"}).parse_args(["models", "--json"])
    assert (args.model_name, args.json) == ("digits", True)


class OlderServer(pb_grpc.DigitServiceServicer):
    """A DigitService older than ListModels (or another implementation of the API): it answers
    GetModelInfo and Predict, and ListModels is UNIMPLEMENTED, as generated servicers answer a
    method they do not define. What it was asked is recorded."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    def GetModelInfo(self, request: pb.GetModelInfoRequest,
                     context: grpc.ServicerContext) -> pb.GetModelInfoResponse:
        self.requests.append(request)
        return pb.GetModelInfoResponse(
            model_name=request.model_name or "old", model_version=2, input_size=16,
            input_shape=[4, 4], input_scale=1 / 255, labels=["a", "b"],
            max_images_per_request=8, loaded_versions=[2], version_labels=["stable"])

    def Predict(self, request: pb.PredictRequest,
                context: grpc.ServicerContext) -> pb.PredictResponse:
        self.requests.append(request)
        response = pb.PredictResponse(model_name=request.model_name or "old", model_version=2)
        for _ in request.images:
            response.predictions.add(probabilities=[0.25, 0.75], class_index=1, label="b",
                                     probability=0.75)
        return response


@pytest.fixture
def older_server() -> Iterator[tuple[str, OlderServer]]:
    servicer = OlderServer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_DigitServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None).wait(5)


def test_info_and_models_from_a_server_without_list_models(
        older_server: tuple[str, OlderServer], capsys: pytest.CaptureFixture[str]) -> None:
    target, _ = older_server
    assert main(["--target", target, "info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "version labels:   this version: stable" in lines
    assert "model state:      not reported (the server does not implement ListModels)" in lines
    assert main(["--target", target, "models"]) == 1
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", (
        f"mnist-client: error: {target} does not implement ListModels (a server older than the "
        "model repository server, or another implementation); `info` shows what it serves\n"))


def test_the_library_names_the_model_and_label_it_asks(
        older_server: tuple[str, OlderServer]) -> None:
    target, servicer = older_server
    with DigitClient(target, model_name="digits") as client:
        result = client.predict([[0] * 16, [255] * 16], label="canary")
        assert (result.model_name, result.model_version) == ("digits", 2)
        result = client.predict([[0] * 4] * 4, model_name="other", model_version=5)
        assert (result.model_name, result.probabilities.shape) == ("other", (1, 2))
        client.predict([0] * 16, model_name="other")
        info = client.get_model_info(model_name="third", label="stable")
        assert list(info.version_labels) == ["stable"]
    asked = [(type(r).__name__, r.model_name, r.version_label, r.model_version)
             for r in servicer.requests]
    # The input shape is asked once per model (it tells a 4×4 image from 4 flat ones), by name.
    assert asked == [
        ("GetModelInfoRequest", "digits", "", 0),
        ("PredictRequest", "digits", "canary", 0),
        ("GetModelInfoRequest", "other", "", 0),
        ("PredictRequest", "other", "", 5),
        ("PredictRequest", "other", "", 0),
        ("GetModelInfoRequest", "third", "stable", 0),
    ]
    with DigitClient(target) as client, pytest.raises(UnimplementedError) as error:
        client.list_models()
    assert error.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_a_v2_load_test_without_a_model_name_needs_the_servers_default(
        older_server: tuple[str, OlderServer], synthetic_data_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # V2 requests name their model; the default comes from ListModels, which this one lacks.
    target, _ = older_server
    code = main(["--target", target, "loadtest", "--data-dir", str(synthetic_data_dir),
                 "--protocol", "oip", "--requests", "5"])
    captured = capsys.readouterr()
    assert (code, captured.out) == (1, "")
    assert captured.err == (
        "mnist-client: error: --protocol oip names the model in every request: give --model-name "
        f"({target} does not implement ListModels to say its default model)\n")
