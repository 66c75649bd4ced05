"""What the server serves: which models, each one's version policy (the newest N, all, the
versions listed, or a pin: ``digitserve.server.versionpolicy``), version labels, canary weight and
gate rules — from flags, or from a model config file (``--model-config``, TOML: docs/models.md,
"The model config file") read with the standard library's ``tomllib`` and checked by the pydantic
models :class:`ConfigFile` and :class:`ModelTable`, which the server reads again when it changes.

Every value is checked; one line names the key, the value and what is allowed (:func:`_line`
words pydantic's first error so). A change that does not parse keeps the previous config in force
(the server logs and counts it, and ListModels reports it). So does an empty file (or one of
comments only: what a file being rewritten in place is for a moment), and a change is applied only
once the file holds still (read_settled).
"""

from __future__ import annotations

import re
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    Strict,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from digitserve.repository import is_model_name
from digitserve.server.settings import Settings
from digitserve.server.versionpolicy import NEWEST, VersionPolicy, from_table, parse_flag, specific
from digitserve.server.versions import GateRules

# A version label: a name, not a number (a number is a version).
LABEL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")

NO_RULES = GateRules()
CANARY = "canary"  # the label that canary_weight sends a share of unpinned calls to


class ModelConfigError(ValueError):
    """The model config file cannot be used: one line naming the key and what is wrong."""


@dataclass(frozen=True)
class ModelPolicy:
    """How one model is served: ``version`` N pins N (0: ``version_policy`` says which versions
    load, by default the newest past the gate, with hot reload); ``labels`` name versions
    (``stable`` answers unpinned calls when set); ``canary_weight`` of the unpinned calls go to
    the ``canary`` label's version."""

    version: int = 0
    labels: Mapping[str, int] = field(default_factory=dict)
    canary_weight: float = 0.0
    rules: GateRules = NO_RULES
    version_policy: VersionPolicy = NEWEST  # with version 0

    @property
    def versions(self) -> VersionPolicy:
        """The version policy in force: a pin is ``specific`` of its version."""
        return specific(self.version) if self.version else self.version_policy


@dataclass(frozen=True)
class ServingConfig:
    """The models to serve (``models`` None: every model found in the repository, each with
    ``policy``), and the default model ("" : the only one served, if there is one)."""

    models: Mapping[str, ModelPolicy] | None
    policy: ModelPolicy = ModelPolicy()
    default_model: str = ""

    def policy_of(self, name: str) -> ModelPolicy:
        return (self.models or {}).get(name, self.policy)

    def serves(self, name: str) -> bool:
        """Whether a model directory of this name is served."""
        return name in self.models if self.models is not None else is_model_name(name)


def from_flags(names: tuple[str, ...], version: int, rules: GateRules, default_model: str,
               versions: VersionPolicy = NEWEST) -> ServingConfig:
    """The config the flags give: ``--model-name`` (repeatable; none: every model),
    ``--model-version`` or ``--version-policy``, the gate flags, ``--default-model`` (else the
    first --model-name)."""
    policy = ModelPolicy(version=version, rules=rules, version_policy=NEWEST if version else versions)
    models = None if not names else {name: policy for name in names}
    return ServingConfig(models, policy, default_model or (names[0] if names else ""))


def from_settings(settings: Settings) -> ServingConfig:
    """What ``settings`` say to serve: the model config file (``--model-config``; raises
    ModelConfigError) or the flags."""
    rules = GateRules(settings.min_check_accuracy, settings.max_regression)
    versions = parse_flag(settings.version_policy)
    if settings.model_config is not None:
        return read(settings.model_config, rules, versions)
    return from_flags(settings.model_name, settings.model_version, rules, settings.default_model, versions)


def _model_name(name: str) -> str:
    if not is_model_name(name):
        raise ValueError(f"{name!r} is not a model name (letters, digits, '.', '_', '-', starting "
                         "with a letter or digit)")
    return name


def _label_name(label: str) -> str:
    if not LABEL_NAME.fullmatch(label):
        raise ValueError("not a label name (a letter, then letters, digits, '.', '_', '-')")
    return label


def _version_policy(value: object) -> VersionPolicy:
    return value if isinstance(value, VersionPolicy) else from_table(value)


Label = Annotated[str, AfterValidator(_label_name)]
Fraction = Annotated[float, Strict(), Field(ge=0, le=1)]


class ModelTable(BaseModel):
    """A ``[models.NAME]`` table of the file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Annotated[int, Strict(), Field(ge=0)] = 0
    version_policy: Annotated[VersionPolicy | None, PlainValidator(_version_policy)] = None
    labels: dict[Label, Annotated[int, Strict(), Field(ge=1)]] = Field(default_factory=dict)
    canary_weight: Fraction = 0.0
    min_check_accuracy: Fraction | None = None  # absent: the --min-check-accuracy flag's
    max_regression: Fraction | None = None

    @model_validator(mode="after")
    def _canary_labelled(self) -> ModelTable:
        if self.canary_weight > 0 and CANARY not in self.labels:
            raise PydanticCustomError("canary", "no canary label", {"weight": self.canary_weight})
        if self.version and self.version_policy is not None:
            raise PydanticCustomError("pin_and_policy", "a pin and a policy", {"version": self.version})
        return self

    def policy(self, rules: GateRules, versions: VersionPolicy = NEWEST) -> ModelPolicy:
        """The policy the table gives, the flags' ``rules`` filling in the gate rules it lacks
        and their version policy ``versions`` when it sets neither version nor version_policy."""
        return ModelPolicy(self.version, self.labels, self.canary_weight, GateRules(
            rules.min_accuracy if self.min_check_accuracy is None else self.min_check_accuracy,
            rules.max_regression if self.max_regression is None else self.max_regression),
            NEWEST if self.version else self.version_policy or versions)


class ConfigFile(BaseModel):
    """The model config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default_model: Annotated[str, Strict()] = ""
    models: dict[Annotated[str, AfterValidator(_model_name)], ModelTable] | None = None


# What a wrong value at each place of the file is told, by its key path (* : a model's or a
# label's name); {where}: the path, {value}: the value.
_WRONG: dict[tuple[str, ...], str] = {
    ("default_model",): "{value!r} is not a model name",
    ("models",): "expected tables [models.NAME]",
    ("models", "*"): "expected a table ([{where}])",
    ("models", "*", "version"): "{value!r} is not 0 (the newest) or a version number",
    ("models", "*", "labels"): "expected a table of label = version",
    ("models", "*", "labels", "*"): "{value!r} is not a version number (1, 2, ...)",
    **{("models", "*", key): "{value!r} is not a number in [0, 1]"
       for key in ("canary_weight", "min_check_accuracy", "max_regression")},
}


def _line(error: ErrorDetails) -> str:
    """Pydantic's ``error`` as the one line naming the key (``models.mnist.labels.stable``)."""
    loc = [str(part) for part in error["loc"] if part != "[key]"]
    where = ".".join(loc)
    if error["type"] == "canary":
        return (f"{where}.canary_weight: {error['ctx']['weight']:g} needs a {CANARY!r} label naming "
                f"the canary version ({where}.labels)")
    if error["type"] == "pin_and_policy":
        return (f"{where}: version = {error['ctx']['version']} and version_policy both say which "
                f"versions serve; set one of them (version = N is version_policy = "
                "{ specific = { versions = [N] } })")
    if error["type"] == "extra_forbidden":
        allowed = ModelTable.model_fields if len(loc) == 3 else ConfigFile.model_fields
        return f"{where}: unknown key; expected one of {', '.join(allowed)}"
    if error["type"] == "value_error":  # a name's own line
        return f"{where}: {error['ctx']['error']}"
    wrong = _WRONG[tuple("*" if i % 2 else part for i, part in enumerate(loc))]
    return f"{where}: {wrong.format(where=where, value=error['input'])}"


def _first(errors: list[ErrorDetails]) -> ErrorDetails:
    """The error a reader meets first: in the file's order, a table's name, then its unknown
    keys, then its values (pydantic lists unknown keys last)."""
    first = errors[0]
    at = [part for part in first["loc"] if part != "[key]"]
    extras = [e for e in errors if e["type"] == "extra_forbidden"
              and len(e["loc"]) - 1 < len(at) and list(e["loc"][:-1]) == at[:len(e["loc"]) - 1]]
    return min(extras, key=lambda e: len(e["loc"]), default=first)


def parse(text: str, rules: GateRules = NO_RULES, versions: VersionPolicy = NEWEST) -> ServingConfig:
    """A config file's text as a ServingConfig; ``rules`` and ``versions``: the gate flags and
    --version-policy, for models that set none. ModelConfigError names what is wrong."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ModelConfigError(f"not valid TOML: {error}") from None
    if not data:
        raise ModelConfigError(
            "the file is empty (or holds only comments): a file being rewritten in place, or "
            "truncated; write default_model = \"\" to serve every model with the flags' policy")
    try:
        file = ConfigFile.model_validate(data)
    except ValidationError as error:
        raise ModelConfigError(_line(_first(error.errors()))) from None
    policy = ModelPolicy(rules=rules, version_policy=versions)
    if file.models is None:
        return ServingConfig(None, policy, file.default_model)
    models = {name: table.policy(rules, versions) for name, table in file.models.items()}
    if file.default_model and file.default_model not in models:
        raise ModelConfigError(f"default_model: {file.default_model!r} is not one of the models listed "
                               f"({', '.join(sorted(models)) or 'none'})")
    return ServingConfig(models, policy,
                         file.default_model or (next(iter(models)) if len(models) == 1 else ""))


def read(path: Path, rules: GateRules = NO_RULES, versions: VersionPolicy = NEWEST) -> ServingConfig:
    """The config file at ``path``; ModelConfigError (its message starts with the path) when it
    cannot be read or used."""
    return _parse_file(path, _snapshot(path)[0], rules, versions)


def _parse_file(path: Path, text: str, rules: GateRules, versions: VersionPolicy) -> ServingConfig:
    try:
        return parse(text, rules, versions)
    except ModelConfigError as error:
        raise ModelConfigError(f"--model-config {path}: {error}") from None


# A changed config file is applied once two reads this many seconds apart find the same text and
# modification time (read_settled), trying at most SETTLE_READS times.
SETTLE_INTERVAL = 0.5
SETTLE_READS = 10

Snapshot = tuple[str, int, int]  # the text, the size and the modification time (ns) after reading it


def _snapshot(path: Path) -> Snapshot:
    try:
        text = path.read_text(encoding="utf-8")
        stat = path.stat()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ModelConfigError(f"--model-config {path}: cannot read it ({reason})") from None
    return text, stat.st_size, stat.st_mtime_ns


def read_settled(path: Path, rules: GateRules = NO_RULES, interval: float = SETTLE_INTERVAL,
                 sleep: Callable[[float], None] = time.sleep, versions: VersionPolicy = NEWEST,
                 ) -> tuple[ServingConfig, tuple[int, int]]:
    """The config file at ``path`` once it holds still, and its (mtime_ns, size) then: it is
    read until two reads ``interval`` seconds apart find the same text, size and modification
    time (a file rewritten in place is read half-written in between: its first half may parse,
    dropping a model or a label). ModelConfigError when it cannot be used, or when it is still
    changing after SETTLE_READS reads (the next look tries again). Blocks: run it in a thread."""
    previous = _snapshot(path)
    for _ in range(SETTLE_READS):
        sleep(interval)
        current = _snapshot(path)
        if current == previous:
            text, size, mtime = current
            return _parse_file(path, text, rules, versions), (mtime, size)
        previous = current
    raise ModelConfigError(
        f"--model-config {path}: still changing after {SETTLE_READS} reads {interval:g}s apart; "
        "applied once it holds still (write the new file beside it and rename it into place)")
