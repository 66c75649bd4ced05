"""digitserve.extras names each extra's modules as pyproject.toml lists its packages, and a command
whose extra is missing gets one line naming it (.ci/client-only.sh runs the commands in a fresh
client-only install)."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib

import pytest

from digitserve import extras
from tests.support import REPO_ROOT

# Optional speed-ups an extra installs that its commands do not require to start.
NOT_REQUIRED = {"ai-edge-litert", "uvloop"}


def _requirements(extra: str) -> set[str]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    names = set()
    for requirement in project["optional-dependencies"][extra]:
        name, _, marker = requirement.partition(";")
        if "platform_machine!='x86_64'" in marker.replace(" ", ""):
            continue  # the other platform's spelling of the same package
        names.add(_normal(re.split(r"[<>=!~\[ ]", name.strip())[0]))
    return names - NOT_REQUIRED


def _normal(name: str) -> str:  # PEP 503: case and runs of -_. do not matter
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.parametrize("extra", sorted(extras.MODULES))
def test_each_extra_names_the_modules_of_its_packages(extra: str) -> None:
    providers = importlib.metadata.packages_distributions()
    provided = {_normal(dist) for module in extras.MODULES[extra] for dist in providers.get(module, [])}
    assert provided == _requirements(extra), (provided, _requirements(extra))


def test_an_installed_extra_passes_and_a_missing_one_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    assert extras.requirement_error("mnist-serve", "server", "mnist-serve") is None
    monkeypatch.setitem(extras.MODULES, "server", ("tensorflow", "no_such_module_here"))
    assert extras.requirement_error("mnist-serve", "server", "mnist-serve") == (
        "mnist-serve: error: mnist-serve needs the 'server' extra, which is not installed (missing: "
        "no_such_module_here); install it with: pip install 'digitserve[server]' (from a checkout: "
        "pip install -e '.[server]')")


def test_mnist_serve_and_mnist_train_check_their_extra_before_anything_else(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from digitserve.server.cli import main as serve
    from digitserve.trainer.cli import main as train

    monkeypatch.setitem(extras.MODULES, "serve", ("no_such_module_here",))
    monkeypatch.setitem(extras.MODULES, "trainer", ("no_such_module_here",))
    assert serve(["--model-repo", "models"]) == 2
    assert train(["train", "--data-dir", "d", "--model-repo", "m", "--model-name", "x"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" needs ")[0] for line in err] == ["mnist-serve: error: mnist-serve",
                                                          "mnist-train: error: train"]
    # the server needs the `serve` extra (no TensorFlow: tests/server/test_slim.py)
    assert all(line.endswith("pip install 'digitserve[serve]' (from a checkout: pip install -e "
                             "'.[serve]')") for line in err[:1])
    assert err[1].endswith("pip install 'digitserve[trainer]' (from a checkout: pip install -e "
                           "'.[trainer]')")


def test_mnist_client_loadtest_checks_its_extra_and_the_other_commands_do_not(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from digitserve.client.cli import main as client

    monkeypatch.setitem(extras.MODULES, "loadtest", ("no_such_module_here",))
    assert client(["--target", "127.0.0.1:1", "loadtest", "--data-dir", "d", "--duration", "1"]) == 2
    assert capsys.readouterr().err == (
        "mnist-client: error: loadtest needs the 'loadtest' extra, which is not installed (missing: "
        "no_such_module_here); install it with: pip install 'digitserve[loadtest]' (from a checkout: "
        "pip install -e '.[loadtest]')\n")
    # predict, evaluate, info and health are the client library's: no extra.
    assert client(["--target", "127.0.0.1:1", "--timeout", "0.5", "health"]) == 1
    assert "extra" not in capsys.readouterr().err


def test_mnist_serve_help_without_its_extra_is_the_help_and_the_install_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from digitserve.server.cli import main as serve

    monkeypatch.setitem(extras.MODULES, "serve", ("pydantic", "no_such_module_here"))
    assert serve(["--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: mnist-serve") and "--max-images-per-request" in out
    assert err == ("mnist-serve: note: serving needs the 'serve' extra, which is not installed "
                   "(missing: no_such_module_here); install it with: pip install 'digitserve[serve]' "
                   "(from a checkout: pip install -e '.[serve]')\n")
