"""mnist-client and DigitClient against a model repository server (issue 15), over a real channel on
127.0.0.1: two models served by one process, version labels and a canary weight from a model
config file; ``--model-name`` and ``--label`` pick what answers and the output says what did,
``models`` and ``info`` show the repository as ListModels says it, and every refusal is one line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from digitserve.client import DigitClient, InvalidInputError
from digitserve.client.cli import format_models, main
from digitserve.client.messages import message_dict
from digitserve.repository import ModelRepository
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc
from tests.servers import ServerThread
from tests.support import publish_copy, wait_for

CANARY_WEIGHT = 0.25
CONFIG = f"""\
default_model = "tiny"

[models.tiny]
labels = {{ stable = 1, canary = 2 }}
canary_weight = {CANARY_WEIGHT}

[models.other]
"""


def publish_as(root: Path, source_dir: Path, name: str) -> int:
    """Publishes the version in ``source_dir`` as the next version of model ``name`` in the
    repository ``root``; returns the version."""
    return publish_copy(ModelRepository(root), source_dir, name)


def labelled_repository(tiny_repo: Path, root: Path) -> tuple[Path, Path]:
    """A repository of model 'tiny', versions 1 to 3 (the tiny model published three times), and
    model 'other', version 1; and a model config: 'tiny' the default model, its label stable on 1
    and canary on 2 with ``CANARY_WEIGHT``. Returns (repository, config file)."""
    source = ModelRepository(tiny_repo).version_dir("tiny", 1)
    repo = root / "labelled-repo"
    repo.mkdir()
    for name in ("tiny", "tiny", "tiny", "other"):
        publish_as(repo, source, name)
    config = root / "models.toml"
    config.write_text(CONFIG)
    return repo, config


@pytest.fixture
def repo_server(tiny_repo: Path, tmp_path: Path,
                start_server: Callable[..., ServerThread]) -> ServerThread:
    """The labelled repository served, once every version its labels and policy keep is serving
    (the labelled ones load after the default one: a test comparing two ListModels answers must
    not see one of them mid-load)."""
    repo, config = labelled_repository(tiny_repo, tmp_path)
    server = start_server(model_repo=repo, model_config=config)

    def settled() -> bool:
        models = {m.name: m for m in list_models(server.target).models}
        serving = {v.version for v in models["tiny"].versions if v.state == pb.VERSION_STATE_SERVING}
        return {1, 2} <= serving and all(v.state != pb.VERSION_STATE_AVAILABLE
                                         for m in models.values() for v in m.versions)

    wait_for(settled, what="the labelled versions serving")
    return server


def list_models(target: str, name: str = "") -> pb.ListModelsResponse:
    """ListModels as the server answers it, without the client library."""
    with grpc.insecure_channel(target) as channel:
        response: pb.ListModelsResponse = pb_grpc.DigitServiceStub(channel).ListModels(
            pb.ListModelsRequest(model_name=name), timeout=10)
    return response


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_predict_and_evaluate_name_the_model_and_label_and_say_what_answered(
        repo_server: ServerThread, synthetic_data_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    target = repo_server.target
    data = str(synthetic_data_dir)
    for flags, answered in ((["--model-name", "other"], ("other", 1)),
                            (["--label", "canary"], ("tiny", 2)),
                            (["--model-name", "tiny", "--label", "stable"], ("tiny", 1)),
                            (["--model-version", "3"], ("tiny", 3))):
        # (--low-confidence 0: 'other' is a weak model, whose answers would get the warning)
        code, out, err = run(capsys, "--target", target, "predict", "--data-dir", data, *flags,
                             "--json", "--low-confidence", "0")
        assert (code, err) == (0, ""), flags
        result = json.loads(out)
        assert (result["model_name"], result["model_version"]) == answered, flags
        code, out, err = run(capsys, "--target", target, "predict", "--data-dir", data, *flags)
        assert code == 0 and out.splitlines()[0] == (
            f"{synthetic_data_dir / 't10k-images-idx3-ubyte.gz'}[0] → model {answered[0]} "
            f"v{answered[1]}"), flags
        code, out, err = run(capsys, "--target", target, "evaluate", "--data-dir", data,
                             "--limit", "20", *flags)
        assert code == 0 and out.startswith(f"model {answered[0]} v{answered[1]}: 20 images"), flags
    # The variables, as the flags.
    env_args = ["--target", target, "predict", "--data-dir", data, "--json"]
    monkey = pytest.MonkeyPatch()
    try:
        monkey.setenv("MNIST_CLIENT_MODEL_NAME", "other")
        code, out, _ = run(capsys, *env_args)
        assert code == 0 and json.loads(out)["model_name"] == "other"
        monkey.setenv("MNIST_CLIENT_MODEL_NAME", "tiny")
        monkey.setenv("MNIST_CLIENT_LABEL", "canary")
        code, out, _ = run(capsys, *env_args)
        assert code == 0 and json.loads(out)["model_version"] == 2
    finally:
        monkey.undo()


def test_what_the_server_does_not_have_is_one_line(
        repo_server: ServerThread, synthetic_data_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    target = repo_server.target
    data = str(synthetic_data_dir)
    for command in (["predict", "--data-dir", data], ["evaluate", "--data-dir", data],
                    ["info"], ["models"]):
        code, out, err = run(capsys, "--target", target, *command, "--model-name", "nope")
        assert (code, out) == (1, ""), command
        assert err == (f"mnist-client: error: {target}: NOT_FOUND: model 'nope' is not served; "
                       "this server serves 'other', 'tiny'\n"), command
    for command in (["predict", "--data-dir", data], ["info"]):
        code, out, err = run(capsys, "--target", target, *command, "--label", "beta")
        assert (code, out) == (1, "") and err.count("\n") == 1, command
        assert err.startswith(f"mnist-client: error: {target}: NOT_FOUND: ") and "'beta'" in err
        assert "canary" in err and "stable" in err, err  # the labels it has


def test_the_library_names_the_model_and_label(repo_server: ServerThread) -> None:
    image = np.zeros((28, 28), np.uint8)
    with DigitClient(repo_server.target, model_name="other") as client:
        result = client.predict(image)
        assert (result.model_name, result.model_version) == ("other", 1)
        result = client.predict(image, model_name="tiny", label="canary")
        assert (result.model_name, result.model_version) == ("tiny", 2)
        assert client.model_info(model_name="tiny", label="stable")["version_labels"] == ["stable"]
        assert client.model_info()["name"] == "other"
        with pytest.raises(InvalidInputError) as error:
            client.predict(image, model_version=1, label="stable")
        assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        listed = client.list_models()
        assert [m.name for m in listed.models] == ["other", "tiny"]
        assert listed.default_model == "tiny"
        as_dict = client.models("tiny")
        assert [m["name"] for m in as_dict["models"]] == ["tiny"]
        assert as_dict["models"][0]["labels"] == {"canary": 2, "stable": 1}
        assert as_dict["models"][0]["canary_weight"] == CANARY_WEIGHT
        assert as_dict["models"][0]["state"] == "MODEL_STATE_SERVING"
    with DigitClient(repo_server.target) as client:  # no model named: the server's default
        assert client.predict(image).model_name == "tiny"


def test_models_prints_the_repository_as_list_models_says(
        repo_server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    target = repo_server.target
    response = list_models(target)
    code, out, err = run(capsys, "--target", target, "models")
    assert (code, err) == (0, "")
    assert out == format_models(response) + "\n"
    lines = out.splitlines()
    assert lines[0].split() == ["MODEL", "STATE", "DEFAULT", "LABELS", "CANARY"]
    rows = {line.split()[0]: line for line in lines[1:] if not line.startswith(" ")}
    assert rows["tiny"].split() == ["tiny", "SERVING", "1", "canary", "→", "2,", "stable", "→",
                                    "1", "25.0", "%"]
    assert rows["other"].split()[:3] == ["other", "SERVING", "1"]
    assert "  version 2  SERVING    canary" in lines and "  version 1  SERVING    stable" in lines
    assert "default model: tiny" in lines
    assert any(line.startswith("model config:  ") and line.endswith("models.toml") for line in lines)
    code, out, err = run(capsys, "--target", target, "models", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == message_dict(response)
    code, out, _ = run(capsys, "--target", target, "models", "--model-name", "other", "--json")
    assert code == 0 and [m["name"] for m in json.loads(out)["models"]] == ["other"]


def test_info_shows_the_models_labels_and_its_versions_states(
        repo_server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    target = repo_server.target
    code, out, err = run(capsys, "--target", target, "info", "--label", "canary")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "model:            tiny version 2"
    tiny = list_models(target, "tiny").models[0]
    versions = ", ".join(f"{v.version} {pb.VersionState.Name(v.state).removeprefix('VERSION_STATE_')}"
                         for v in tiny.versions)
    assert "model state:      SERVING, default version 1" in lines
    assert "version labels:   canary → 2, stable → 1 (this version: canary)" in lines
    assert "canary weight:    25.0 % of unpinned calls go to version 2 (label canary)" in lines
    assert f"versions:         {versions}" in lines
    code, out, _ = run(capsys, "--target", target, "info", "--model-name", "other", "--json")
    info = json.loads(out)
    assert code == 0 and (info["model_name"], info["version_labels"]) == ("other", [])
