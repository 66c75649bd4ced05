"""Docs that describe other files say what those files say today (issue 24, item 10): the
containers page's readiness probe is the one k8s/base declares, mnist-serve's --help describes what
it serves and what --keep-versions does, and pyproject.toml's comments name tables it has."""

from __future__ import annotations

import re
import tomllib
from typing import Any

import yaml

from digitserve.server.settings import build_parser
from tests.support import REPO_ROOT


def _readiness_probe() -> dict[str, Any]:
    """The readinessProbe of k8s/base's server container."""
    for document in yaml.safe_load_all((REPO_ROOT / "k8s" / "base" / "server.yaml").read_text()):
        if document and document.get("kind") == "Deployment":
            container = document["spec"]["template"]["spec"]["containers"][0]
            return dict(container["readinessProbe"])
    raise AssertionError("k8s/base/server.yaml has no Deployment")


def test_the_containers_page_names_the_readiness_probe_k8s_base_declares() -> None:
    probe = _readiness_probe()
    assert "httpGet" in probe, probe
    text = (REPO_ROOT / "docs" / "containers.md").read_text(encoding="utf-8")
    sentence = re.search(r"Probes: readiness is (.*?)\.\s", text, re.S)
    assert sentence, "docs/containers.md has no 'Probes: readiness is ...' sentence"
    said = " ".join(sentence.group(1).split())
    assert f"HTTP GET of `{probe['httpGet']['path']}`" in said, said
    assert "gRPC probe" not in said and "Once the HTTP edge exists" not in text


def test_mnist_serve_help_says_it_serves_every_model_over_grpc_and_http() -> None:
    description = " ".join((build_parser({}).description or "").split())
    assert description.startswith("Serve every model of a model repository over gRPC"), description
    assert "with --http-port, the Open Inference Protocol over HTTP" in description, description


def test_keep_versions_help_says_it_loads_nothing_at_a_start() -> None:
    """--keep-versions only delays unloading under a latest policy (registry.py's _evict): its help
    must not promise versions a restart does not load."""
    action = next(a for a in build_parser({})._actions if "--keep-versions" in a.option_strings)
    text = " ".join((action.help or "").split())
    assert text.startswith("With a latest:N version policy, how many of the newest loaded versions "
                           "stay loaded when a newer one replaces them"), text
    assert "It loads nothing itself: a start loads only the policy's versions" in text, text
    assert "ignored under specific and all" in text, text


def test_pyproject_comments_name_tables_that_exist() -> None:
    """A comment's ``[tool.x.y]`` is a table of the file (8aac2c8 named
    [tool.setuptools.packages.find], which it did not have)."""
    text = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    comments = "\n".join(line.split("#", 1)[1] for line in text.splitlines() if "#" in line)
    named = re.findall(r"\[(tool(?:\.[\w-]+)+)\]", comments)
    assert named, "no table named in a comment: the test checks nothing"
    for table in named:
        node: Any = data
        for key in table.split("."):
            assert isinstance(node, dict) and key in node, f"pyproject.toml has no [{table}]"
            node = node[key]
