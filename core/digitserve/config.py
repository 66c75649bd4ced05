"""One command-line mechanism for mnist-serve, mnist-client and mnist-train: ``Parser``, argparse
where each option added by ``add_option`` is also an ``MNIST_*`` variable, shown in --help with its
default and choices, and where abbreviations are refused (the error names the option abbreviated).

A variable is converted and checked only when its command runs, by argparse's own type and choice
checks, so a bad one is the same one-line usage error (exit 2) as a bad flag, naming the variable.
An empty variable is unset; a flag beats the environment, also the variable of another member of
its mutually exclusive group. The server declares its options in ``digitserve.server.settings``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

ENV_PREFIX = "MNIST_"
_BOOLS = {"1": True, "true": True, "yes": True, "on": True,
          "0": False, "false": False, "no": False, "off": False}


def env_name(name: str, prefix: str = ENV_PREFIX) -> str:
    """``model_repo`` or ``--model-repo`` -> ``MNIST_MODEL_REPO``."""
    return prefix + name.lstrip("-").replace("-", "_").upper()


def show_default(default: Any) -> str:
    """A default as --help shows it: ``none``, ``on``/``off``, or the value."""
    return "none" if default is None else ("on" if default else "off") if isinstance(default, bool) \
        else str(default)


class _DeprecatedStore(argparse.Action):
    """``store``, with one warning line when the option is spelt by one of its ``deprecated`` aliases."""

    def __init__(self, *args: Any, deprecated: Sequence[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deprecated = deprecated

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if option_string in self.deprecated:
            print(f"{parser.prog}: warning: {option_string} is deprecated and will be removed; "
                  f"use {self.option_strings[0]}", file=sys.stderr)
        setattr(namespace, self.dest, values)


class Parser(argparse.ArgumentParser):
    """argparse with ``allow_abbrev=False`` everywhere and options that are also variables."""

    def __init__(self, *args: Any, env: Mapping[str, str] | None = None,
                 env_prefix: str = ENV_PREFIX, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False  # `--targ`, `--ind 3`: never; sub-parsers are Parsers too
        super().__init__(*args, **kwargs)
        self.env: Mapping[str, str] = os.environ if env is None else env
        self.env_prefix = env_prefix
        self._variables: dict[str, tuple[argparse.Action, str, Any]] = {}  # dest -> its variable, default
        self._repeatable: set[str] = set()  # dests of action="append": the variable is comma-separated
        self._exclusive: list[tuple[Any, list[argparse.Action]]] = []  # groups and their options
        self._commands: Any = None  # the sub-parsers action, if any

    def add_mutually_exclusive_group(self, **kwargs: Any) -> Any:
        group = super().add_mutually_exclusive_group(**kwargs)
        self._exclusive.append((group, []))
        return group

    def add_subparsers(self, **kwargs: Any) -> Any:
        kwargs.setdefault("parser_class", functools.partial(type(self), env=self.env,
                                                            env_prefix=self.env_prefix))
        self._commands = super().add_subparsers(**kwargs)
        return self._commands

    def flags(self) -> set[str]:
        """Every option string of this parser and its sub-commands."""
        subs = self._commands.choices.values() if self._commands is not None else ()
        return set(self._option_string_actions).union(*(sub.flags() for sub in subs))

    def _unrecognized(self, words: Sequence[str]) -> str:
        """argparse's message for words no option took, plus the option an unknown one
        abbreviates, if it abbreviates exactly one."""
        message = f"unrecognized arguments: {' '.join(words)}"
        flags = self.flags()
        for name in (w.split("=", 1)[0] for w in words if w.startswith("--")):
            longer = sorted(f for f in flags if f.startswith(name))
            if len(longer) == 1:
                message += f" (abbreviations are not accepted: did you mean {longer[0]}?)"
        return message

    def _unknown_before_command(self, words: Sequence[str]) -> str | None:
        """The first unknown option before the sub-command: argparse would take the word after it
        for the sub-command and say ``invalid choice: '127.0.0.1:1'`` instead of naming it."""
        index = 0
        while self._commands is not None and index < len(words):
            word = words[index]
            if word in ("--", "-") or not word.startswith("-"):
                return None
            action = self._option_string_actions.get(word.split("=", 1)[0])
            if action is None:
                return word
            index += 1 if "=" in word or action.nargs == 0 else 2
        return None

    def parse_args(  # type: ignore[override]  # only the (args, namespace) form is used
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self._unrecognized(extras))
        return parsed

    def add_option(
        self, *flags: str, help: str, env: str | None = None, to: Any = None,
        default: Any = None, default_text: str | None = None, required: bool = False,
        deprecated: Sequence[str] = (), **kwargs: Any,
    ) -> argparse.Action:
        """``add_argument`` for an option that is also the variable ``env`` (by default the
        prefix plus the first flag's name). ``to`` is a group to add it to; ``deprecated`` names
        aliases among ``flags`` that print a warning when used."""
        variable = env or env_name(flags[0], self.env_prefix)
        from_env = bool(self.env.get(variable))
        if deprecated:
            kwargs.update(action=_DeprecatedStore, deprecated=deprecated)
        container: Any = self if to is None else to
        members = next((m for group, m in self._exclusive if group is container), None)
        if from_env and members is not None:
            container.required = False  # the variable answers a required mutually exclusive group
        # None stands for "not given" until parse_known_args puts the variable or the default there.
        action: argparse.Action = container.add_argument(
            *flags, default=default if default is argparse.SUPPRESS else None,
            required=required and not from_env, help=help, **kwargs)
        self._variables[action.dest] = (action, variable, default)
        if kwargs.get("action") == "append":
            self._repeatable.add(action.dest)
        if members is not None:
            members.append(action)
        if default_text is None:
            default_text = "required" if required else show_default(default)
        suffix = f"[{variable}; default: {default_text}"
        if action.choices is not None:
            suffix += f"; choices: {', '.join(str(c) for c in action.choices)}"
        action.help = f"{help} {suffix.replace('%', '%%')}]"
        return action

    def parse_known_args(  # type: ignore[override]  # only the (args, namespace) form is used
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        words = list(sys.argv[1:] if args is None else args)
        unknown = self._unknown_before_command(words)
        if unknown is not None:
            self.error(self._unrecognized([unknown]))
        parsed, extras = super().parse_known_args(words, namespace)
        given = {word.split("=", 1)[0] for word in words if word.startswith("-")}
        overruled = {a.dest for _, members in self._exclusive  # another member given as a flag
                     if any(set(m.option_strings) & given for m in members)
                     for a in members if not set(a.option_strings) & given}
        for dest, (action, variable, default) in self._variables.items():
            if getattr(parsed, dest, None) is not None:
                continue  # given as a flag
            text = self.env.get(variable)
            if text and dest not in overruled:
                setattr(parsed, dest, self._convert(action, variable, text))
            elif default is not argparse.SUPPRESS:
                setattr(parsed, dest, default)
        return parsed, extras

    def _convert(self, action: argparse.Action, variable: str, text: str) -> Any:
        """A variable's text, converted and checked as the flag's would be."""
        if action.nargs == 0:  # a switch: MNIST_LOADTEST_VERIFY=0 is --no-verify
            if text.strip().lower() not in _BOOLS:
                self.error(f"argument {action.option_strings[0]}: invalid boolean value: {text!r}, "
                           f"not one of {', '.join(_BOOLS)} (from {variable})")
            return _BOOLS[text.strip().lower()]
        repeatable = action.dest in self._repeatable
        items = []
        for item in filter(None, [t.strip() for t in text.split(",")] if repeatable else [text]):
            try:
                items.append(self._get_value(action, item))
                self._check_value(action, items[-1])
            except argparse.ArgumentError as exc:
                self.error(f"{exc} (from {variable})")
        return items if repeatable else items[0]
