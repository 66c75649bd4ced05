"""A model's version policy, as TF Serving's ``model_version_policy`` and Triton's
``version_policy`` define it: which published versions stay loaded — the newest N that pass the
gate, all of them, or those listed. Two spellings, each checked with one line saying what is
expected: the flag's (``--version-policy latest:2``, ``all``, ``specific:1,3``) and the config
file's table, in Triton's shape (``version_policy = { latest = { num_versions = 2 } }``)."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

Kind = Literal["latest", "all", "specific"]

FLAG_FORMS = "latest:N (the N newest versions that pass the gate), all, or specific:V,V,... (those versions)"
TABLE_FORMS = ("{ latest = { num_versions = N } }, { all = {} } or "
               "{ specific = { versions = [V, ...] } }")


@dataclass(frozen=True)
class VersionPolicy:
    """``latest``: the ``num_versions`` newest versions that pass the gate; ``all``: every
    version that passes; ``specific``: ``versions`` (ascending, once each), those that pass."""

    kind: Kind = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def __str__(self) -> str:
        """The flag's spelling."""
        if self.kind == "latest":
            return f"latest:{self.num_versions}"
        if self.kind == "specific":
            return "specific:" + ",".join(map(str, self.versions))
        return "all"

    def candidates(self, present: set[int]) -> list[int]:
        """The versions of ``present`` it may load, newest first (``latest`` stops after its
        ``num_versions`` that pass: the registry counts them)."""
        if self.kind == "specific":
            return sorted(present.intersection(self.versions), reverse=True)
        return sorted(present, reverse=True)


NEWEST = VersionPolicy()  # the default: the newest version that passes the gate


def specific(*versions: int) -> VersionPolicy:
    return VersionPolicy("specific", versions=tuple(sorted(set(versions))))


def _number(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() and int(text) >= 1 else None


def parse_flag(text: str) -> VersionPolicy:
    """``--version-policy``'s value; "" is the default (latest:1). ValueError: one line."""
    value = text.strip()
    if not value:
        return NEWEST
    kind, _, rest = value.partition(":")
    if kind == "all" and not rest:
        return VersionPolicy("all")
    if kind == "latest" and (count := _number(rest)) is not None:
        return VersionPolicy("latest", num_versions=count)
    if kind == "specific":
        numbers = [_number(part.strip()) for part in rest.split(",")]
        if rest and None not in numbers:
            return specific(*(n for n in numbers if n is not None))
    raise ValueError(f"version policy {text!r} is not {FLAG_FORMS}; versions and N are whole "
                     "numbers from 1")


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def from_table(value: object) -> VersionPolicy:
    """The config file's ``version_policy`` (TOML, as parsed). ValueError: one line, without the
    key, which the caller names."""
    expected = f"expected one of {TABLE_FORMS}"
    if not isinstance(value, dict) or len(value) != 1:
        raise ValueError(f"{value!r}: {expected}")
    [(kind, body)] = value.items()
    if kind == "all":
        if body != {}:
            raise ValueError(f"all takes no keys ({body!r}): write {{ all = {{}} }}")
        return VersionPolicy("all")
    if kind == "latest":
        count = body.get("num_versions") if isinstance(body, dict) and set(body) == {"num_versions"} else None
        if _count(count) is None:
            raise ValueError(f"latest {body!r}: expected {{ num_versions = N }} with N a whole number "
                             "from 1 (how many of the newest versions that pass the gate serve)")
        return VersionPolicy("latest", num_versions=typing.cast(int, count))
    if kind == "specific":
        versions = body.get("versions") if isinstance(body, dict) and set(body) == {"versions"} else None
        if not isinstance(versions, list) or not versions or any(_count(v) is None for v in versions):
            raise ValueError(f"specific {body!r}: expected {{ versions = [V, ...] }}, one or more "
                             "version numbers (1, 2, ...)")
        return specific(*versions)
    raise ValueError(f"{kind!r} is not a version policy: {expected}")
