"""One configuration mechanism: every option of mnist-serve, mnist-client and mnist-train is a flag
and an MNIST_* variable, shown in --help with its default and choices; no abbreviations."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from digitserve.client.cli import build_parser as client_parser
from digitserve.client.cli import main as client_main
from digitserve.server.settings import build_parser as server_parser
from digitserve.trainer.cli import build_parser as trainer_parser
from digitserve.trainer.cli import main as trainer_main
from tests.support import walk_parsers

# What every command needs to parse at all, given through the environment.
BASE_ENV = {"MNIST_MODEL_REPO": "/repo", "MNIST_DATA_DIR": "/data", "MNIST_MODEL_NAME": "m"}

COMMANDS: dict[str, Callable[[dict[str, str]], argparse.ArgumentParser]] = {
    "mnist-serve": server_parser,
    "mnist-client": client_parser,
    "mnist-train": trainer_parser,
}


def _options(command: str) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, argparse.Action]]:
    for path, parser in walk_parsers(COMMANDS[command](dict(BASE_ENV))):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            yield path, parser, action


def _every_option() -> list[Any]:
    return [pytest.param(command, path, action.option_strings[0],
                         id=" ".join((command, *path, action.option_strings[0])))
            for command in COMMANDS for path, _, action in _options(command)]


def _find(command: str, path: tuple[str, ...], flag: str) -> argparse.Action:
    return next(a for p, _, a in _options(command) if p == path and flag in a.option_strings)


def _variable(action: argparse.Action) -> str:
    match = re.search(r"\[(MNIST_[A-Z0-9_]+); default: ", action.help or "")
    assert match, f"{action.option_strings[0]}: help names no MNIST_* variable: {action.help!r}"
    return match.group(1)


def _sample(action: argparse.Action, default: Any) -> tuple[str, Any]:
    """A value for the option's variable other than its default, and what it parses to."""
    if isinstance(action, argparse._StoreTrueAction | argparse.BooleanOptionalAction):
        return "yes", True
    if isinstance(action, argparse._StoreFalseAction):
        return "off", False
    if action.choices is not None:
        choice = next(c for c in reversed(list(action.choices)) if c != default)
        return str(choice), choice
    kind: Any = action.type or str
    positive = kind.__name__ in ("_positive_int", "_positive_ints")  # a count, or a list of them
    text = {int: "7", float: "0.25", Path: "/x"}.get(kind, "7" if positive else "abc")
    return text, kind(text)


@pytest.mark.parametrize(("command", "path", "flag"), _every_option())
def test_every_option_is_a_flag_and_a_variable_shown_in_help(
        command: str, path: tuple[str, ...], flag: str) -> None:
    action = _find(command, path, flag)
    help_text = action.help or ""
    variable = _variable(action)
    assert re.search(r"; default: [^;\]]+", help_text), f"{flag}: no default in {help_text!r}"
    if action.choices is not None:
        shown = re.search(r"; choices: ([^\]]+)\]", help_text)
        assert shown and shown.group(1) == ", ".join(str(c) for c in action.choices), help_text
    # The variable really sets the option, and the flag still beats it.
    argv = list(path) or (["health"] if command == "mnist-client" else [])
    builtin = COMMANDS[command]({**BASE_ENV}).parse_args(argv)
    text, expected = _sample(action, getattr(builtin, action.dest))
    parsed = COMMANDS[command]({**BASE_ENV, variable: text}).parse_args(argv)
    if action.nargs is None and action.const is None and isinstance(getattr(parsed, action.dest), list):
        expected = [expected]  # a repeatable option: its variable is a comma-separated list
    assert getattr(parsed, action.dest) == expected, f"{variable}={text!r} did not set {flag}"
    assert getattr(parsed, action.dest) != getattr(builtin, action.dest)


def test_help_of_each_command_shows_variables_defaults_and_choices(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        trainer_parser({}).parse_args(["train", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "[MNIST_PRESET; default: default; choices: cnn, default, seed]" in out
    assert "[MNIST_SEED; default: 42]" in out
    with pytest.raises(SystemExit):
        server_parser({}).parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "[MNIST_INFERENCE; default: auto; choices: auto, litert, tensorflow]" in out
    assert "MNIST_AUTH_TOKEN" in out  # named by --auth-token-file's help, but never a flag
    assert "--auth-token " not in out and "[MNIST_AUTH_TOKEN;" not in out


@pytest.mark.parametrize(("command", "argv", "env", "message"), [
    ("mnist-serve", [], {"MNIST_PORT": "many"},
     "argument --port: invalid int value: 'many' (from MNIST_PORT)"),
    ("mnist-serve", [], {"MNIST_INFERENCE": "gpu"},
     "argument --inference: invalid choice: 'gpu' (choose from 'auto', 'litert', 'tensorflow') "
     "(from MNIST_INFERENCE)"),
    ("mnist-serve", [], {"MNIST_ALLOW_MISSING_CHECK_SET": "maybe"},
     "argument --allow-missing-check-set: invalid boolean value: 'maybe', not one of 1, true, yes, "
     "on, 0, false, no, off (from MNIST_ALLOW_MISSING_CHECK_SET)"),
    ("mnist-client", ["health"], {"MNIST_TIMEOUT": "soon"},
     "argument --timeout: invalid float value: 'soon' (from MNIST_TIMEOUT)"),
    ("mnist-client", ["loadtest"], {"MNIST_LOADTEST_ENGINE": "h3"},
     "argument --engine: invalid choice: 'h3' (choose from 'h2', 'grpc') (from MNIST_LOADTEST_ENGINE)"),
    ("mnist-train", ["train"], {"MNIST_EPOCHS": "0"},
     "argument --epochs: must be at least 1: 0 (from MNIST_EPOCHS)"),
    ("mnist-train", ["train"], {"MNIST_PRESET": "huge"},
     "argument --preset: invalid choice: 'huge' (choose from 'cnn', 'default', 'seed') "
     "(from MNIST_PRESET)"),
], ids=["serve-int", "serve-choice", "serve-bool", "client-float", "client-choice",
        "train-type", "train-choice"])
def test_a_bad_variable_is_a_usage_error_naming_it(
        command: str, argv: list[str], env: dict[str, str], message: str,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in {**BASE_ENV, **env}.items():
        monkeypatch.setenv(name, value)
    if command == "mnist-serve":
        from digitserve.server.cli import main as serve_main

        with pytest.raises(SystemExit) as info:
            serve_main(argv)
        code = info.value.code
    elif command == "mnist-client":
        with pytest.raises(SystemExit) as info:
            client_main(argv)
        code = info.value.code
    else:
        code = trainer_main(argv)
    assert code == 2
    err = capsys.readouterr().err
    prog = " ".join([command, *argv[:1]]) if command != "mnist-serve" else command
    if command == "mnist-client" and argv[0] == "health":  # --timeout is the top level's
        prog = command
    assert err.splitlines()[-1] == f"{prog}: error: {message}"
    assert "Traceback" not in err


def test_a_bad_variable_of_another_sub_command_is_not_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Variables are converted only for the command that runs: a loadtest knob cannot break health."""
    parsed = client_parser({"MNIST_LOADTEST_CONCURRENCY": "lots"}).parse_args(["health"])
    assert parsed.command == "health"


@pytest.mark.parametrize(("command", "argv", "unknown"), [
    ("mnist-serve", ["--model-repo", "/r", "--model-nam", "x"], "--model-nam"),
    ("mnist-client", ["--targ=127.0.0.1:1", "health"], "--targ"),
    ("mnist-client", ["predict", "--data-dir", "/d", "--ind", "3"], "--ind"),
    ("mnist-client", ["loadtest", "--data-dir", "/d", "--conc", "3"], "--conc"),
    ("mnist-train", ["train", "--data-dir", "/d", "--model-repo", "/r", "--model-name", "m",
                     "--pre", "seed"], "--pre"),
    ("mnist-train", ["fetch", "--data", "/d"], "--data"),
])
def test_abbreviations_are_refused_everywhere(
        command: str, argv: list[str], unknown: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        COMMANDS[command]({}).parse_args(argv)
    assert info.value.code == 2
    assert unknown in capsys.readouterr().err.splitlines()[-1]
    for _, parser in walk_parsers(COMMANDS[command]({})):
        assert parser.allow_abbrev is False, parser.prog


def test_train_takes_model_name_and_the_deprecated_name(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["train", "--data-dir", "/d", "--model-repo", "/r"]
    assert trainer_parser({}).parse_args([*base, "--model-name", "digits"]).model_name == "digits"
    assert capsys.readouterr().err == ""
    assert trainer_parser({}).parse_args([*base, "--name", "digits"]).model_name == "digits"
    assert capsys.readouterr().err == (
        "mnist-train train: warning: --name is deprecated and will be removed; use --model-name\n")
    assert trainer_parser({"MNIST_MODEL_NAME": "env"}).parse_args(base).model_name == "env"


def test_the_trainer_reads_what_the_container_sets() -> None:
    """What docker/entrypoint.sh used to turn into flags, mnist-train now reads itself."""
    env = {"MNIST_DATA_DIR": "/data", "MNIST_MODEL_REPO": "/models", "MNIST_MODEL_NAME": "mnist",
           "MNIST_PRESET": "seed", "MNIST_EPOCHS": "2", "MNIST_SEED": "7"}
    args = trainer_parser(env).parse_args(["train"])
    assert (args.data_dir, args.model_repo, args.model_name, args.preset, args.epochs, args.seed) == (
        "/data", "/models", "mnist", "seed", 2, 7)
    assert trainer_parser(env).parse_args(["fetch"]).data_dir == "/data"
    # compose passes MNIST_EPOCHS: ${MNIST_EPOCHS:-}: an empty variable is unset
    assert trainer_parser({**env, "MNIST_EPOCHS": ""}).parse_args(["train"]).epochs is None


def test_a_flag_beats_the_variable_of_another_member_of_its_group() -> None:
    """--rate excludes --concurrency: with MNIST_LOADTEST_CONCURRENCY set (the image sets it),
    `loadtest --rate 100` is an open loop, not both; --image beats MNIST_DATA_DIR."""
    env = {"MNIST_DATA_DIR": "/data", "MNIST_LOADTEST_CONCURRENCY": "8",
           "MNIST_LOADTEST_DURATION": "30"}
    args = client_parser(env).parse_args(["loadtest", "--rate", "100", "--requests", "5"])
    assert (args.rate, args.concurrency, args.requests, args.duration) == (100.0, 1, 5, None)
    args = client_parser(env).parse_args(["loadtest"])
    assert (args.rate, args.concurrency, args.duration, args.data_dir) == (0.0, 8, 30.0, Path("/data"))
    args = client_parser(env).parse_args(["predict", "--image", "x.png"])
    assert (args.image, args.data_dir) == (Path("x.png"), None)


def test_a_repeated_flag_replaces_its_comma_separated_variable() -> None:
    """--model-name given as flags replaces MNIST_MODEL_NAME (the image may set it) instead of
    crashing argparse's append with the variable's default; without flags the variable is the list."""
    from digitserve.server.settings import load_settings

    env = {"MNIST_MODEL_REPO": "/r", "MNIST_MODEL_NAME": "a, b"}
    parsed = server_parser(env).parse_args(["--model-name", "x", "--model-name", "y"])
    assert parsed.model_name == ["x", "y"]
    assert server_parser(env).parse_args([]).model_name == ["a", "b"]
    assert load_settings(["--model-name", "x"], env).model_name == ("x",)


def test_server_choices_are_the_models_and_the_logs() -> None:
    """Settings' Literal types (the flags' choices) name what digitserve.inference and
    digitserve.server.logs accept."""
    from digitserve.inference import INFERENCE_CHOICES
    from digitserve.server.logs import ACCESS_LOG_MODES, FORMATS
    from digitserve.server.settings import ACCESS_LOG_MODES as SETTINGS_ACCESS_LOG_MODES
    from digitserve.server.settings import FORMATS as SETTINGS_FORMATS
    from digitserve.server.settings import INFERENCE_CHOICES as SETTINGS_INFERENCE

    assert SETTINGS_INFERENCE == INFERENCE_CHOICES and SETTINGS_FORMATS == FORMATS
    assert SETTINGS_ACCESS_LOG_MODES == ACCESS_LOG_MODES


@pytest.mark.parametrize(("overrides", "message"), [
    ({"max_queue_delay_ms": -1.0}, "max queue delay -1.0 ms is negative"),
    ({"max_picture_decoded_bytes": 100},
     "max picture decoded bytes 100 is below 3136 (a 28×28 picture in colour)"),
    ({"picture_threads": 65}, "picture threads 65 is not in 1..64"),
    ({"repository_timeout": 0.0}, "repository timeout 0.0 is not in (0, 86400] seconds"),
    ({"http_read_timeout": 3601.0}, "http read timeout 3601.0 is not in (0, 3600] seconds"),
    ({"worker_heartbeat_timeout": 1.0},
     "worker heartbeat timeout 1.0 is not 0 (off) or in [2, 86400] seconds"),
    ({"min_check_accuracy": 1.5}, "min check accuracy 1.5 is not in [0, 1]"),
    ({"max_queued_images": 10}, "max queued images 10 is below max images per request 1024"),
    ({"max_picture_request_bytes": 2048, "max_picture_bytes": 4096},
     "max picture request bytes 2048 is below max picture bytes 4096"),
    ({"keep_versions": 0, "workers": 0}, "workers 0 is below 1; keep versions 0 is below 1"),
])
def test_each_check_is_one_line_naming_the_option(overrides: dict[str, Any], message: str) -> None:
    """The server's checks, from flags (load_settings) or in code (Settings), each one line that names
    the option in words, its value and the range it must be in; several problems in one line."""
    from digitserve.server.settings import Settings, load_settings

    argv = [f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()]
    with pytest.raises(ValueError) as info:
        load_settings(["--model-repo", "r", *argv], env={})
    assert str(info.value) == message
    with pytest.raises(ValueError, match=re.escape(message)):
        Settings(model_repo=Path("r"), **overrides)


def test_settings_errors_never_show_the_token_and_refuse_unknown_fields() -> None:
    """A missing or mistyped field names the field, never the input (which holds every field, the
    token included); a field Settings does not have is an error, not silently dropped."""
    from digitserve.server.settings import Settings

    secret = "tok-3f9c1e"
    for kwargs, message in [({"auth_token": secret}, "model repo: field required"),
                            ({"model_repo": Path("r"), "auth_token": secret, "prot": 1},
                             "prot: unexpected keyword argument"),
                            ({"model_repo": Path("r"), "auth_token": secret, "inference": "gpu"},
                             "inference 'gpu' is not one of auto, litert, tensorflow")]:
        with pytest.raises(ValueError) as info:
            Settings(**kwargs)
        assert message in str(info.value) and secret not in str(info.value)
