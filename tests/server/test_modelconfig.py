"""The model config file and the flags that say what to serve: every value checked, one line
naming the key; the flags' --model-name repeatable (a comma-separated variable); the version
policy in the file (Triton's shape) and by --version-policy."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from digitserve.server.configwatch import ConfigWatcher
from digitserve.server.health import HealthServicer
from digitserve.server.modelconfig import (
    SETTLE_READS,
    ModelConfigError,
    ModelPolicy,
    ServingConfig,
    from_flags,
    from_settings,
    parse,
    read,
    read_settled,
)
from digitserve.server.registry import Registry
from digitserve.server.settings import load_settings
from digitserve.server.telemetry import ConfigMetrics, Telemetry
from digitserve.server.versionpolicy import NEWEST, VersionPolicy
from digitserve.server.versions import GateRules, RepositoryReads
from tests.servers import make_settings

FULL = """
default_model = "mnist"

[models.mnist]
version = 0
labels = { stable = 3, canary = 4 }
canary_weight = 0.25
min_check_accuracy = 0.5

[models.fashion]
version = 2
"""


def test_a_full_config_reads_as_written() -> None:
    config = parse(FULL, GateRules(max_regression=0.05))
    assert config.default_model == "mnist"
    assert config.models == {
        "mnist": ModelPolicy(0, {"stable": 3, "canary": 4}, 0.25, GateRules(0.5, 0.05)),
        "fashion": ModelPolicy(2, {}, 0.0, GateRules(0.0, 0.05)),
    }
    assert config.serves("fashion") and not config.serves("digits")


def test_without_a_models_table_every_model_is_served_with_the_flags_rules() -> None:
    config = parse('default_model = "mnist"\n', GateRules(0.9))
    assert config == ServingConfig(None, ModelPolicy(rules=GateRules(0.9)), "mnist")
    assert config.serves("digits") and not config.serves(".staging") and not config.serves("lost+found")
    assert parse("[models.one]\n").default_model == "one"  # the only model listed


EMPTY = ("the file is empty (or holds only comments): a file being rewritten in place, or truncated; "
         "write default_model = \"\" to serve every model with the flags' policy")


@pytest.mark.parametrize(("text", "message"), [
    ("models = 3", "models: expected tables [models.NAME]"),
    ("[model.mnist]", "model: unknown key; expected one of default_model, models"),
    ("[models.mnist]\nlabel = { stable = 1 }",
     "models.mnist.label: unknown key; expected one of version, version_policy, labels, "
     "canary_weight, min_check_accuracy, max_regression"),
    ("[models.mnist]\nversion = -1", "models.mnist.version: -1 is not 0 (the newest) or a version number"),
    ("[models.mnist]\nversion = '2'", "models.mnist.version: '2' is not 0 (the newest) or a version number"),
    ("[models.mnist]\nlabels = { stable = 0 }",
     "models.mnist.labels.stable: 0 is not a version number (1, 2, ...)"),
    ("[models.mnist]\nlabels = { 3 = 1 }",
     "models.mnist.labels.3: not a label name (a letter, then letters, digits, '.', '_', '-')"),
    ("[models.mnist]\nlabels = [1]", "models.mnist.labels: expected a table of label = version"),
    ("[models.mnist]\ncanary_weight = 1.5", "models.mnist.canary_weight: 1.5 is not a number in [0, 1]"),
    ("[models.mnist]\ncanary_weight = 0.1",
     "models.mnist.canary_weight: 0.1 needs a 'canary' label naming the canary version "
     "(models.mnist.labels)"),
    ("[models.mnist]\nmax_regression = true", "models.mnist.max_regression: True is not a number in [0, 1]"),
    ('[models."../x"]', "models.../x: '../x' is not a model name (letters, digits, '.', '_', '-', "
                        "starting with a letter or digit)"),
    ('default_model = "digits"\n[models.mnist]',
     "default_model: 'digits' is not one of the models listed (mnist)"),
    ("[models.mnist", "not valid TOML: Expected ']' at the end of a table declaration (at end of document)"),
    # Several mistakes: the first a reader meets (a table's name, then its unknown keys, then
    # its values in order, model by model).
    ("[models.mnist]\nversion = -1\nbogus = 1",
     "models.mnist.bogus: unknown key; expected one of version, version_policy, labels, "
     "canary_weight, min_check_accuracy, max_regression"),
    ('[models."../x"]\nbogus = 1', "models.../x: '../x' is not a model name (letters, digits, '.', "
                                   "'_', '-', starting with a letter or digit)"),
    ("[models.a]\ncanary_weight = 0.5\n[models.b]\nversion = -1",
     "models.a.canary_weight: 0.5 needs a 'canary' label naming the canary version (models.a.labels)"),
    ("x = 1\n[models.a]\nversion = -1", "x: unknown key; expected one of default_model, models"),
    ("", EMPTY),
    ("# the models\n\n   \n", EMPTY),
])
def test_each_mistake_is_one_line_naming_the_key(text: str, message: str) -> None:
    with pytest.raises(ModelConfigError) as info:
        parse(text)
    assert str(info.value) == message


def test_a_changed_file_is_taken_only_once_two_reads_agree(tmp_path: Path) -> None:
    """read_settled reads until the file holds still: a writer that rewrites it in place
    between the reads (first half, then the rest) never has its first half taken, and a file
    that keeps changing is an error naming the path, not a config."""
    path = tmp_path / "models.toml"
    whole = '[models.mnist]\nlabels = { stable = 1 }\n\n[models.fashion]\n'
    steps = iter([whole[:15], whole, None])  # what the file holds after each pause (None: as is)
    half = whole[:whole.index("[models.fashion]")]
    path.write_text(half)  # the first read: half of it, and it parses
    assert parse(half).models == {"mnist": ModelPolicy(labels={"stable": 1})}
    naps: list[float] = []

    def writer(seconds: float) -> None:  # the pause between two reads: the file is rewritten
        naps.append(seconds)
        text = next(steps)
        if text is not None:
            with path.open("r+") as file:
                file.truncate(0)
                file.write(text)

    config, (mtime, size) = read_settled(path, interval=0.25, sleep=writer)
    assert config == parse(whole) and size == len(whole) and mtime == path.stat().st_mtime_ns
    assert naps == [0.25, 0.25, 0.25]
    counter = iter(range(100))

    def busy(seconds: float) -> None:
        path.write_text(f'default_model = "m{next(counter)}"\n[models.m{next(counter)}]\n')

    with pytest.raises(ModelConfigError) as info:
        read_settled(path, interval=0.25, sleep=busy)
    assert str(info.value) == (f"--model-config {path}: still changing after {SETTLE_READS} reads "
                               "0.25s apart; applied once it holds still (write the new file "
                               "beside it and rename it into place)")


def test_a_file_that_cannot_be_read_names_the_flag_and_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError) as info:
        read(tmp_path / "missing.toml")
    missing = tmp_path / "missing.toml"
    assert str(info.value) == f"--model-config {missing}: cannot read it (No such file or directory)"
    path = tmp_path / "models.toml"
    path.write_text("[models.mnist]\nversion = -1\n")
    with pytest.raises(ModelConfigError) as info:
        read(path)
    assert str(info.value) == (f"--model-config {path}: models.mnist.version: -1 is not 0 (the newest) "
                               "or a version number")


def test_the_flags_name_models_repeatably_and_the_variable_with_commas() -> None:
    settings = load_settings(["--model-repo", "r", "--model-name", "a", "--model-name", "b"], env={})
    assert settings.model_name == ("a", "b")
    assert from_flags(settings.model_name, 0, GateRules(), "").default_model == "a"
    assert load_settings(["--model-repo", "r"], env={"MNIST_MODEL_NAME": "a, b,"}).model_name == ("a", "b")
    assert load_settings(["--model-repo", "r"], env={}).model_name == ()  # every model
    assert from_flags((), 0, GateRules(), "").models is None


@pytest.mark.parametrize(("argv", "message"), [
    (["--model-version", "3"], "--model-version pins a version of one model: give exactly one --model-name"),
    (["--model-name", "a", "--model-name", "b", "--model-version", "3"],
     "--model-version pins a version of one model: give exactly one --model-name"),
    (["--model-config", "m.toml", "--model-name", "a"],
     "--model-config lists the models, their versions and the default model: leave out --model-name, "
     "--model-version and --default-model"),
    (["--model-name", "../a"], "model name '../a' is not a model directory's name (letters, digits, '.', "
                               "'_', '-', starting with a letter or digit)"),
])
def test_flags_that_do_not_go_together_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        load_settings(["--model-repo", "r", *argv], env={})
    assert str(info.value) == message


def test_a_changed_config_file_keeps_the_flags_gate_rules_for_models_that_set_none(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text("[models.a]\nmin_check_accuracy = 0.9\n")
    settings = make_settings(tmp_path, model_config=path, min_check_accuracy=0.5, max_regression=0.1)

    async def scenario() -> None:
        registry = Registry(settings, from_settings(settings), reads=RepositoryReads(60),
                            telemetry=Telemetry(), health=HealthServicer())
        watcher = ConfigWatcher(path, registry, registry.reads, ConfigMetrics(registry.telemetry.registry))
        path.write_text("[models.a]\nmin_check_accuracy = 0.9\n\n[models.b]\n")
        assert await watcher.look() and registry.config_error == ""
        assert registry.config.policy_of("a").rules == GateRules(0.9, 0.1)
        assert registry.config.policy_of("b").rules == GateRules(0.5, 0.1)  # the flags'

    asyncio.run(scenario())


POLICY_FORMS = ("{ latest = { num_versions = N } }, { all = {} } or "
                "{ specific = { versions = [V, ...] } }")


def test_a_version_policy_reads_in_tritons_shape_and_a_pin_is_specific() -> None:
    config = parse("[models.a]\nversion_policy = { latest = { num_versions = 2 } }\n"
                   "[models.b]\nversion_policy = { all = {} }\n"
                   "[models.c]\nversion_policy = { specific = { versions = [3, 1, 3] } }\n"
                   "[models.d]\nversion = 4\n"
                   "[models.e]\n", versions=VersionPolicy("latest", num_versions=3))
    assert config.models is not None
    policies = {name: policy.versions for name, policy in config.models.items()}
    assert policies == {"a": VersionPolicy("latest", num_versions=2), "b": VersionPolicy("all"),
                        "c": VersionPolicy("specific", versions=(1, 3)),
                        "d": VersionPolicy("specific", versions=(4,)),
                        "e": VersionPolicy("latest", num_versions=3)}  # the flag's, for a table without
    assert [str(p) for p in policies.values()] == ["latest:2", "all", "specific:1,3", "specific:4",
                                                   "latest:3"]
    assert parse("[models.a]\n").models == {"a": ModelPolicy()}  # the default: the newest
    assert ModelPolicy().versions == VersionPolicy("latest", num_versions=1) == NEWEST
    every = parse('default_model = ""\n', versions=VersionPolicy("all"))  # no tables: the flag's
    assert every.policy_of("anything").versions == VersionPolicy("all")


@pytest.mark.parametrize(("text", "message"), [
    ("version_policy = { latest = 2 }", "latest 2: expected { num_versions = N } with N a whole number "
     "from 1 (how many of the newest versions that pass the gate serve)"),
    ("version_policy = { latest = { num_versions = 0 } }", "latest {'num_versions': 0}: expected "
     "{ num_versions = N } with N a whole number from 1 (how many of the newest versions that pass "
     "the gate serve)"),
    ("version_policy = { latest = { num_versions = true } }", "latest {'num_versions': True}: expected "
     "{ num_versions = N } with N a whole number from 1 (how many of the newest versions that pass "
     "the gate serve)"),
    ("version_policy = { latest = { num_versions = 2, n = 1 } }", "latest {'num_versions': 2, 'n': 1}: "
     "expected { num_versions = N } with N a whole number from 1 (how many of the newest versions "
     "that pass the gate serve)"),
    ("version_policy = { specific = { versions = [] } }", "specific {'versions': []}: expected "
     "{ versions = [V, ...] }, one or more version numbers (1, 2, ...)"),
    ("version_policy = { specific = { versions = [1, 0] } }", "specific {'versions': [1, 0]}: expected "
     "{ versions = [V, ...] }, one or more version numbers (1, 2, ...)"),
    ("version_policy = { specific = [1] }", "specific [1]: expected { versions = [V, ...] }, one or "
     "more version numbers (1, 2, ...)"),
    ("version_policy = { all = { x = 1 } }", "all takes no keys ({'x': 1}): write { all = {} }"),
    ("version_policy = { newest = {} }", f"'newest' is not a version policy: expected one of {POLICY_FORMS}"),
    ("version_policy = { all = {}, latest = { num_versions = 1 } }",
     f"{{'all': {{}}, 'latest': {{'num_versions': 1}}}}: expected one of {POLICY_FORMS}"),
    ('version_policy = "all"', f"'all': expected one of {POLICY_FORMS}"),
])
def test_each_version_policy_mistake_is_one_line_naming_the_key(text: str, message: str) -> None:
    with pytest.raises(ModelConfigError) as info:
        parse(f"[models.mnist]\n{text}\n")
    assert str(info.value) == f"models.mnist.version_policy: {message}"


def test_a_pin_and_a_version_policy_together_are_refused_in_one_line() -> None:
    with pytest.raises(ModelConfigError) as info:
        parse("[models.mnist]\nversion = 2\nversion_policy = { all = {} }\n")
    assert str(info.value) == ("models.mnist: version = 2 and version_policy both say which versions "
                               "serve; set one of them (version = N is version_policy = "
                               "{ specific = { versions = [N] } })")
    # version = 0 is "not pinned": a policy goes with it
    assert parse("[models.m]\nversion = 0\nversion_policy = { all = {} }\n").policy_of("m").versions == \
        VersionPolicy("all")


@pytest.mark.parametrize(("value", "policy"), [
    ("latest:2", VersionPolicy("latest", num_versions=2)), ("all", VersionPolicy("all")),
    ("specific:3, 1,3", VersionPolicy("specific", versions=(1, 3))), ("", NEWEST),
    ("latest:1", NEWEST),
])
def test_the_version_policy_flag_and_its_variable(value: str, policy: VersionPolicy) -> None:
    for settings in (load_settings(["--model-repo", "r", "--version-policy", value], env={}),
                     load_settings(["--model-repo", "r"], env={"MNIST_VERSION_POLICY": value})):
        config = from_settings(settings)
        assert config.policy.versions == policy and config.models is None
    named = from_settings(load_settings(["--model-repo", "r", "--model-name", "a", "--version-policy",
                                         value], env={}))
    assert named.policy_of("a").versions == policy


@pytest.mark.parametrize(("argv", "message"), [
    (["--version-policy", "latest:0"], "version policy 'latest:0' is not latest:N (the N newest "
     "versions that pass the gate), all, or specific:V,V,... (those versions); versions and N are "
     "whole numbers from 1"),
    (["--version-policy", "specific:1,,2"], "version policy 'specific:1,,2' is not latest:N (the N "
     "newest versions that pass the gate), all, or specific:V,V,... (those versions); versions and N "
     "are whole numbers from 1"),
    (["--version-policy", "all:2"], "version policy 'all:2' is not latest:N (the N newest versions "
     "that pass the gate), all, or specific:V,V,... (those versions); versions and N are whole "
     "numbers from 1"),
    (["--model-name", "a", "--model-version", "2", "--version-policy", "latest:1"],
     "--model-version 2 and --version-policy latest:1 both say which versions serve: set one of them "
     "(--model-version N is --version-policy specific:N)"),
])
def test_version_policy_flags_that_do_not_parse_or_go_together_are_refused(
        argv: list[str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        load_settings(["--model-repo", "r", *argv], env={})
    assert str(info.value) == message
    # --model-version alone keeps working: a pin is specific
    pinned = from_settings(load_settings(["--model-repo", "r", "--model-name", "a", "--model-version", "2"],
                                         env={}))
    assert pinned.policy_of("a").versions == VersionPolicy("specific", versions=(2,))


def test_a_changed_config_file_keeps_the_flags_version_policy_for_models_that_set_none(
        tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text("[models.a]\n")
    settings = make_settings(tmp_path, model_config=path, version_policy="latest:3")

    async def scenario() -> None:
        registry = Registry(settings, from_settings(settings), reads=RepositoryReads(60),
                            telemetry=Telemetry(), health=HealthServicer())
        assert registry.config.policy_of("a").versions == VersionPolicy("latest", num_versions=3)
        watcher = ConfigWatcher(path, registry, registry.reads, ConfigMetrics(registry.telemetry.registry))
        path.write_text("[models.a]\nversion_policy = { all = {} }\n\n[models.b]\n")
        assert await watcher.look() and registry.config_error == ""
        assert registry.config.policy_of("a").versions == VersionPolicy("all")
        flags = VersionPolicy("latest", num_versions=3)
        assert registry.config.policy_of("b").versions == flags  # the flag's

    asyncio.run(scenario())
