"""Every ``--help`` of mnist-serve, mnist-client and mnist-train and of each of their sub-commands:
every option has help text of its own, shows its default (or says it is required) and its choices
where it has choices, and every sub-command says what it does. Checked on the argparse parsers,
and on the text the real commands print (one process per command and sub-command)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Callable

import pytest

from digitserve.client.cli import build_parser as client_parser
from digitserve.server.settings import build_parser as server_parser
from digitserve.trainer.cli import build_parser as trainer_parser
from tests.support import REPO_ROOT, walk_parsers

COMMANDS: dict[str, tuple[str, Callable[[dict[str, str]], argparse.ArgumentParser]]] = {
    "mnist-serve": ("digitserve.server", server_parser),
    "mnist-client": ("digitserve.client", client_parser),
    "mnist-train": ("digitserve.trainer", trainer_parser),
}
SUFFIX = re.compile(r" \[(MNIST_[A-Z0-9_]+); default: ([^;\]]+)(?:; choices: ([^\]]+))?\]$")


def _every_parser() -> list[object]:
    """(command, sub-command words) for each --help there is, built without any MNIST_* variable
    (a variable would answer a required option and change what help says)."""
    return [pytest.param(command, path, id=" ".join((command, *path)))
            for command, (_, build) in COMMANDS.items() for path, _ in walk_parsers(build({}))]


def _parser(command: str, path: tuple[str, ...]) -> argparse.ArgumentParser:
    return dict(walk_parsers(COMMANDS[command][1]({})))[path]


def problems(parser: argparse.ArgumentParser) -> list[str]:
    """What the parser's help leaves out, one line per problem."""
    found: list[str] = []
    required_groups = [g for g in parser._mutually_exclusive_groups if g.required]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if not (choice.help or "").strip():
                    found.append(f"sub-command {choice.dest}: no help text")
            continue
        flag = action.option_strings[0] if action.option_strings else action.dest
        text = action.help or ""
        suffix = SUFFIX.search(text)
        if suffix is None:
            found.append(f"{flag}: help does not end [MNIST_*; default: ...]: {text!r}")
            continue
        if not text[: suffix.start()].strip():
            found.append(f"{flag}: no help text of its own")
        default = suffix.group(2)
        if action.required and default != "required":
            found.append(f"{flag}: required, but help says default: {default}")
        if any(action in g._group_actions for g in required_groups) and "required" not in default:
            found.append(f"{flag}: one of its group is required, but help says default: {default}")
        if not action.required and default == "required":
            found.append(f"{flag}: help says required, argparse does not require it")
        choices = None if action.choices is None else ", ".join(str(c) for c in action.choices)
        if suffix.group(3) != choices:
            found.append(f"{flag}: choices {choices!r}, help shows {suffix.group(3)!r}")
    return found


@pytest.mark.parametrize(("command", "path"), _every_parser())
def test_every_option_has_help_a_default_and_its_choices(command: str, path: tuple[str, ...]) -> None:
    assert problems(_parser(command, path)) == []


@pytest.mark.parametrize(("command", "path"), _every_parser())
def test_the_real_help_shows_them(command: str, path: tuple[str, ...]) -> None:
    """``COMMAND [SUB] --help`` as a process prints each option with its whole help (variable,
    default and choices included) and each sub-command with its line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
    env["COLUMNS"] = "1000"  # one line per option: nothing wrapped mid-phrase
    proc = subprocess.run([sys.executable, "-m", COMMANDS[command][0], *path, "--help"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert (proc.returncode, proc.stderr) == (0, "")
    out = proc.stdout
    assert out.startswith(f"usage: {' '.join((command, *path))} ")
    entries = _entries(out)
    parser = _parser(command, path)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:  # listed under the positional, deeper in
                item = rf"\s+{re.escape(choice.dest)}\s+{re.escape(choice.help or '')}"
                assert any(re.fullmatch(item, line) for line in out.splitlines()), (choice.dest, out)
            continue
        shown = " ".join((action.help or "").replace("%%", "%").split())
        flag = action.option_strings[0]
        assert any(e.split(" ")[0].rstrip(",") == flag and e.endswith(" " + shown)
                   for e in entries), f"{flag}: {shown!r} not in\n{out}"


def _entries(help_text: str) -> list[str]:
    """Each item of the help's lists (an option or a sub-command with its text), on one line:
    an item starts two columns in, its text may continue on more indented lines."""
    entries: list[str] = []
    for line in help_text.splitlines():
        if re.match(r"  \S", line):
            entries.append(line.strip())
        elif re.match(r"   +\S", line) and entries:
            entries[-1] += " " + line.strip()
    return [" ".join(e.split()) for e in entries]


SERVE_GROUPS = ["model repository", "network", "limits", "batching", "security", "observability"]
RST_MARKUP = re.compile(r"``|:(class|func|meth|mod|attr|data|exc|obj|ref|doc):`")


def test_serve_help_is_in_groups() -> None:
    """``mnist-serve --help`` (the real command) lists its options under six headings, in order, each
    option under one of them (none under the bare "options:" but -h)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
    proc = subprocess.run([sys.executable, "-m", "digitserve.server", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, env={**env, "COLUMNS": "1000"})
    assert (proc.returncode, proc.stderr) == (0, "")
    headings = [line[:-1] for line in proc.stdout.splitlines() if re.fullmatch(r"[a-z][a-z ]+:", line)]
    assert headings == ["options", *SERVE_GROUPS]
    parser = server_parser({})
    grouped = {g.title: g._group_actions for g in parser._action_groups}
    assert [a.option_strings for a in grouped["options"]] == [["-h", "--help"]]
    assert all(grouped[title] for title in SERVE_GROUPS)


@pytest.mark.parametrize(("command", "path"), _every_parser())
def test_no_help_shows_markup(command: str, path: tuple[str, ...]) -> None:
    """Help is read in a terminal: no reStructuredText markup (``x``, :class:`X`) in any of it."""
    text = _parser(command, path).format_help()
    assert not RST_MARKUP.search(text), RST_MARKUP.search(text)


CONFIGURATION = REPO_ROOT / "docs" / "configuration.md"
GENERATED = re.compile(r"<!-- BEGIN generated by `python -m digitserve.server.settings`[^\n]*-->\n"
                       r"(.*?)<!-- END generated -->", re.S)


def test_the_configuration_page_is_the_generated_reference() -> None:
    """docs/configuration.md holds, word for word, the flag reference the declaration generates:
    a flag added, renamed, regrouped or re-described without regenerating the page
    (``python -m digitserve.server.settings``) fails here. Its first column lists every flag of
    the real parser and its second every variable, the token's included."""
    from digitserve.server.settings import markdown

    match = GENERATED.search(CONFIGURATION.read_text(encoding="utf-8"))
    assert match, f"{CONFIGURATION} has no generated flag reference"
    assert match.group(1) == markdown(), "stale: regenerate with python -m digitserve.server.settings"
    rows = [line.split(" | ") for line in match.group(1).splitlines() if line.startswith("| `--")
            or line.startswith("| (none")]
    documented = {flag for row in rows for flag in re.findall(r"`(--[a-z0-9-]+)`", row[0])}
    flags = {f for a in server_parser({})._actions for f in a.option_strings} - {"-h", "--help"}
    assert documented == flags
    variables = {row[1].strip("`") for row in rows}
    assert variables == {m.group(1) for a in server_parser({})._actions
                         if (m := SUFFIX.search(a.help or ""))} | {"MNIST_AUTH_TOKEN"}


def test_the_generated_reference_fails_for_a_flag_without_its_doc(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above is not a tautology: one more option in the declaration (as a new flag would
    be) makes the generated reference differ from the committed page."""
    from pydantic.fields import FieldInfo

    from digitserve.server import settings

    match = GENERATED.search(CONFIGURATION.read_text(encoding="utf-8"))
    assert match and match.group(1) == settings.markdown()
    extra = settings.opt(1, "limits", "A new limit.")
    assert isinstance(extra, FieldInfo)
    extra.annotation = int
    monkeypatch.setitem(settings.FIELDS, "max_new_things", extra)
    assert "--max-new-things" in settings.markdown() and match.group(1) != settings.markdown()
    assert "--max-new-things" in server_parser({}).format_help()
