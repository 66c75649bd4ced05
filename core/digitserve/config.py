"""One configuration mechanism for every command: each option is a flag and an ``MNIST_*`` variable.

``Parser`` is argparse with three rules added: abbreviations are refused (sub-parsers included;
the error names the unknown option, and the option it abbreviates),
every option added through :meth:`Parser.add_option` (or :func:`add_fields`, from a dataclass) is
also read from an environment variable, and its help shows that variable, its default and its
choices. A variable is converted and checked only when its command runs, by argparse's own type
and choice checks, so a bad value is the same one-line usage error (exit 2) as a bad flag, naming
the variable. An empty variable counts as unset. A flag given on the command line wins over the
environment, also over a variable of another member of its mutually exclusive group.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

ENV_PREFIX = "MNIST_"

_BOOLS = {"1": True, "true": True, "yes": True, "on": True,
          "0": False, "false": False, "no": False, "off": False}


def env_name(name: str, prefix: str = ENV_PREFIX) -> str:
    """``model_repo`` or ``--model-repo`` -> ``MNIST_MODEL_REPO``."""
    return prefix + name.lstrip("-").replace("-", "_").upper()


def parse_bool(text: str) -> bool:
    """1/0, true/false, yes/no, on/off (any case); ValueError otherwise."""
    try:
        return _BOOLS[text.strip().lower()]
    except KeyError:
        raise ValueError(f"not one of {', '.join(_BOOLS)}") from None


@dataclasses.dataclass(frozen=True)
class FromEnv:
    """A default read from the environment, still text: converted after parsing, if still used."""

    name: str
    text: str

    def __str__(self) -> str:
        return self.text


class _DeprecatedStore(argparse.Action):
    """``store``, with one warning line when the option is spelt by a deprecated alias."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        deprecated: Mapping[str, str] = getattr(parser, "deprecated_flags", {})
        if option_string is not None and option_string in deprecated:
            print(f"{parser.prog}: warning: {option_string} is deprecated and will be removed; "
                  f"use {deprecated[option_string]}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _is_switch(action: argparse.Action) -> bool:
    """An option that takes no value (store_true/store_false, --x/--no-x): its variable is a bool."""
    return action.nargs == 0


class Parser(argparse.ArgumentParser):
    """argparse with ``allow_abbrev=False`` everywhere and options that are also variables."""

    def __init__(self, *args: Any, env: Mapping[str, str] | None = None,
                 env_prefix: str = ENV_PREFIX, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False  # `--targ`, `--ind 3`: never; sub-parsers are Parsers too
        super().__init__(*args, **kwargs)
        self.env: Mapping[str, str] = os.environ if env is None else env
        self.env_prefix = env_prefix
        self.deprecated_flags: dict[str, str] = {}
        self.repeatable: set[str] = set()  # dests of options that may be given several times
        self._builtin: dict[str, Any] = {}  # dest -> the default when its variable is not used
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
        flags = set(self._option_string_actions)
        for sub in self._commands.choices.values() if self._commands is not None else ():
            flags |= sub.flags()
        return flags

    def _unrecognized(self, words: Sequence[str]) -> str:
        """argparse's message for words no option took, plus the option an unknown one
        abbreviates, if it abbreviates exactly one."""
        message = f"unrecognized arguments: {' '.join(words)}"
        flags = self.flags()
        for word in words:
            name = word.split("=", 1)[0]
            if not name.startswith("--"):
                continue
            longer = sorted(f for f in flags if f.startswith(name))
            if len(longer) == 1:
                message += f" (abbreviations are not accepted: did you mean {longer[0]}?)"
        return message

    def _unknown_before_command(self, words: Sequence[str]) -> str | None:
        """The first unknown option before the sub-command: argparse would take the word after it
        for the sub-command and say ``invalid choice: '127.0.0.1:1'`` instead of naming it."""
        if self._commands is None:
            return None
        index = 0
        while index < len(words):
            word = words[index]
            if word == "--" or word == "-" or not word.startswith("-"):
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
        text = self.env.get(variable)
        from_env = FromEnv(variable, text) if text else None
        if deprecated:
            kwargs["action"] = _DeprecatedStore
            for alias in deprecated:
                self.deprecated_flags[alias] = flags[0]
        container: Any = self if to is None else to
        members = next((m for group, m in self._exclusive if group is container), None)
        if from_env is not None and members is not None:
            container.required = False  # the variable answers a required mutually exclusive group
        action: argparse.Action = container.add_argument(
            *flags, default=default if from_env is None else from_env,
            required=required and from_env is None, help=help, **kwargs,
        )
        self._builtin[action.dest] = default
        if members is not None:
            members.append(action)
        shown = default_text if default_text is not None else _show(action, default)
        suffix = f"[{variable}; default: {shown}"
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
        overruled: set[str] = set()
        for _, members in self._exclusive:
            if any(set(a.option_strings) & given for a in members):
                overruled.update(a.dest for a in members if not set(a.option_strings) & given)
        for action in self._actions:
            value = getattr(parsed, action.dest, None)
            if not isinstance(value, FromEnv):
                continue
            if action.dest in overruled:  # another member of its group was given as a flag
                setattr(parsed, action.dest, self._builtin.get(action.dest))
                continue
            setattr(parsed, action.dest, self._convert(action, value))
        return parsed, extras

    def _convert(self, action: argparse.Action, value: FromEnv) -> Any:
        if _is_switch(action):
            try:
                flag = parse_bool(value.text)
            except ValueError as exc:
                self.error(f"argument {action.option_strings[0]}: invalid boolean value: "
                           f"{value.text!r}, {exc} (from {value.name})")
            return flag  # the variable names the value: MNIST_LOADTEST_VERIFY=0 is --no-verify
        if action.dest in self.repeatable:  # a comma-separated variable
            items = []
            for text in (t.strip() for t in value.text.split(",")):
                if text:
                    try:
                        item = self._get_value(action, text)
                        self._check_value(action, item)
                    except argparse.ArgumentError as exc:
                        self.error(f"{exc} (from {value.name})")
                    items.append(item)
            return items
        try:
            converted = self._get_value(action, value.text)
            self._check_value(action, converted)
        except argparse.ArgumentError as exc:
            self.error(f"{exc} (from {value.name})")
        return converted


def _show(action: argparse.Action, default: Any) -> str:
    if default is None:
        return "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default)


def _kind(hint: Any) -> tuple[Any, tuple[Any, ...] | None]:
    """The argparse type and choices of a field's annotation: ``X | None`` is X, ``Literal[...]``
    gives its values as choices and their type."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1:
            return _kind(inner[0])
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), choices
    return hint, None


def add_fields(parser: Parser, cls: type[Any]) -> None:
    """One option per dataclass field (``--field-name``, ``MNIST_FIELD_NAME``): its type, choices
    and whether it is required come from the annotation and the default, its help from
    ``metadata["help"]``. Fields with ``metadata["env_only"]`` are skipped (secrets: no flag)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("env_only"):
            continue
        flag = "--" + f.name.replace("_", "-")
        kind, choices = _kind(hints[f.name])
        has_default = f.default is not dataclasses.MISSING
        default = f.default if has_default else None
        help_text = f.metadata["help"]
        if kind is bool:  # --flag / --no-flag; the variable takes 1|0|true|false|yes|no|on|off
            parser.add_option(flag, action=argparse.BooleanOptionalAction, default=default,
                              help=help_text)
            continue
        if typing.get_origin(kind) is tuple:  # repeatable; the variable is comma-separated
            item = typing.get_args(kind)[0]
            action = parser.add_option(flag, action="append", type=item, default=None, help=help_text,
                                       default_text=f.metadata.get("default_text", "none"))
            parser.repeatable.add(action.dest)
            continue
        parser.add_option(flag, type=kind, choices=choices, default=default,
                          required=not has_default, help=help_text,
                          default_text=f.metadata.get("default_text") if has_default else "required")


def env_only(cls: type[Any], env: Mapping[str, str], prefix: str = ENV_PREFIX) -> dict[str, Any]:
    """The values of ``cls``'s env-only fields (secrets) that the environment sets, unconverted."""
    return {f.name: env.get(env_name(f.name, prefix)) for f in dataclasses.fields(cls)
            if f.metadata.get("env_only")}
