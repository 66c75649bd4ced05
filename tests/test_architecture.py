"""The project's modules import each other without a cycle, and none reaches into another's private
names; both read from the source with `ast`.

Every import counts wherever it stands: at module level, inside a function (a lazy import is still
a dependency, only a later one), and under `if TYPE_CHECKING:` (the type checker follows it, and a
module that needs another's types to be written depends on it as surely as one that calls it).
`from pkg import name` is an edge to `pkg.name` when that is a module of ours, else to `pkg`.
Generated protobuf code (`*_pb2*.py`) is not ours to arrange and is left out.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# (source root, top-level package) for every package of the project: the package
# `digitserve` has one source root per top-level folder (pyproject.toml's package-dir).
SOURCE_ROOTS = ("core", "protos", "server", "client", "trainer")
PACKAGES = (*((ROOT / root, "digitserve") for root in SOURCE_ROOTS), (ROOT, "bench"))


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for base, package in PACKAGES:
        for path in sorted((base / package).rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")) or "node_modules" in path.parts:
                continue
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> Iterator[str]:
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _ours(alias.name, modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = name.split(".")
                if not is_package:
                    anchor.pop()
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                target = f"{base}.{alias.name}"
                yield from _ours(target if target in modules else base, modules)


def _ours(target: str, modules: dict[str, Path]) -> Iterator[str]:
    # `import a.b.c` runs a, a.b and a.b.c; the edge that matters is the deepest module of ours.
    while target and target not in modules:
        target = target.rpartition(".")[0]
    if target:
        yield target


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {t for t in _imports(name, path, modules) if t != name}
        for name, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


# Other projects' private names we must use: os._exit is documented API; the restricted unpickler
# (digitserve.trainer.data) hands out numpy's own array reconstructor, which numpy's pickles name.
EXTERNAL_PRIVATE = {"os._exit", "multiarray._reconstruct"}


def private_reaches() -> list[str]:
    """Every `obj._name` where obj is not `self` or `cls`, and every `from ours import _name`: a
    module using what another keeps to itself (its own instances' through self, its class's
    through cls, are its business)."""
    modules = _modules()
    found = []
    for path in modules.values():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Attribute) and _private(node.attr):
                owner = ast.unparse(node.value)
                if owner not in ("self", "cls") and f"{owner}.{node.attr}" not in EXTERNAL_PRIVATE:
                    found.append(f"{where} {owner}.{node.attr}")
            elif (isinstance(node, ast.ImportFrom) and node.module and not node.level
                  and any(node.module == m or node.module.startswith(m + ".") for m in modules)):
                found += [f"{where} from {node.module} import {a.name}"
                              for a in node.names if _private(a.name)]
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_the_graph_sees_the_project() -> None:
    graph = import_graph()
    # The scan finds lazy and TYPE_CHECKING imports, not only module-level ones: a few edges we know.
    assert "digitserve.server.settings" in graph["digitserve.server.cli"]
    assert "digitserve.idx" in graph["digitserve.trainer.data"]
    assert len(graph) > 50, sorted(graph)


def test_no_import_cycles() -> None:
    graph = import_graph()
    found = cycles(graph)
    print(f"\n{len(graph)} modules, {sum(map(len, graph.values()))} import edges, cycles: {found}")
    assert found == [], "import cycles (each a set of modules importing each other): " + "; ".join(
        " <-> ".join(c) for c in found
    )


def test_no_module_uses_another_modules_private_names() -> None:
    found = private_reaches()
    assert found == [], "private names used from outside: " + "; ".join(found)


def test_the_model_protocol_declares_what_callers_read() -> None:
    from digitserve.inference import Model
    from tests.support import FakeModel

    members = set(Model.__annotations__) | {n for n in vars(Model) if not n.startswith("_")}
    assert {"spec", "metadata", "predict", "inline", "inference_path"} <= members, members
    fake = FakeModel()
    assert [m for m in sorted(members) if not hasattr(fake, m)] == []
    # Callers read the members directly: a getattr with a default would hide a model without one.
    found = [
        f"{path.relative_to(ROOT)}:{node.lineno} getattr(..., {node.args[1].value!r})"
        for path in _modules().values()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
        and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and node.args[1].value in members
    ]
    assert found == [], found


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def forbidden_imports(graph: dict[str, set[str]], package: str, forbidden: tuple[str, ...]) -> list[str]:
    """Each module of ``forbidden`` packages that a module of ``package`` imports, directly or
    through other modules of the project (every import counts, lazy ones included), as the chain
    of imports that reaches it (breadth first: the shortest chain)."""
    start = sorted(m for m in graph if _in(m, package))
    parent: dict[str, str | None] = dict.fromkeys(start)
    queue = list(start)
    found = []
    while queue:
        module = queue.pop(0)
        for target in sorted(graph.get(module, ())):
            if target in parent:
                continue
            parent[target] = module
            if any(_in(target, f) for f in forbidden):
                chain = [target]
                while (step := parent[chain[-1]]) is not None:
                    chain.append(step)
                found.append(" -> ".join(reversed(chain)))
            else:
                queue.append(target)
    return found


# (package, the packages it must never import): the trainer and the server share what runs a model
# through digitserve.inference, never each other; the client library installs without either.
LAYERS = [
    ("digitserve.trainer", ("digitserve.server",)),
    ("digitserve.client", ("digitserve.server", "digitserve.trainer", "digitserve.inference")),
    ("digitserve.inference", ("digitserve.server", "digitserve.trainer", "digitserve.client")),
]


@pytest.mark.parametrize(("package", "forbidden"), LAYERS, ids=[p for p, _ in LAYERS])
def test_packages_import_only_what_their_layer_allows(package: str, forbidden: tuple[str, ...]) -> None:
    graph = import_graph()
    assert any(_in(m, package) for m in graph), f"no module of {package} found"
    found = forbidden_imports(graph, package, forbidden)
    assert found == [], f"{package} imports {' or '.join(forbidden)}: " + "; ".join(found)


def test_forbidden_imports_are_found_through_other_modules() -> None:
    graph = {"a.x": {"core.y"}, "core.y": {"core.z"}, "core.z": {"b.w"}, "b.w": set()}
    assert forbidden_imports(graph, "a", ("b",)) == ["a.x -> core.y -> core.z -> b.w"]
    assert forbidden_imports(graph, "core", ("a",)) == []


# (an edge's modules, the protobuf packages of the other edges): each edge converts its own messages
# to server.infertypes' neutral request and back, never another edge's, directly or through the other
# edges' modules and the shared inference path (the registry's health names its gRPC service by
# digitserve.v1's descriptor: not a message an edge builds, so the walk stays among these modules).
EDGES = [
    (("digitserve.server.rest", "digitserve.server.restcodec"), ("digitserve.oip", "digitserve.v1")),
    (("digitserve.server.servicer", "digitserve.server.v1codec", "digitserve.server.wire"),
     ("digitserve.oip",)),
    (("digitserve.server.oip", "digitserve.server.oipcodec", "digitserve.server.oipstream"),
     ("digitserve.v1",)),
    (("digitserve.server.infer", "digitserve.server.infertypes", "digitserve.server.pixels",
      "digitserve.server.tritonconfig"), ("digitserve.oip", "digitserve.v1")),
]
_EDGE_MODULES = {m for modules, _ in EDGES for m in modules} | {
    "digitserve.server.status", "digitserve.server.errors", "digitserve.server.dataplane",
    "digitserve.server.decoding", "digitserve.oip", "digitserve.v1"}


@pytest.mark.parametrize(("modules", "forbidden"), EDGES, ids=[m[0] for m, _ in EDGES])
def test_no_edge_imports_another_edge_s_messages(modules: tuple[str, ...],
                                                 forbidden: tuple[str, ...]) -> None:
    graph = {m: {t for t in targets if t in _EDGE_MODULES}
             for m, targets in import_graph().items() if m in _EDGE_MODULES}
    for module in modules:
        assert module in graph, f"{module} not found"
        found = forbidden_imports(graph, module, forbidden)
        assert found == [], f"{module} imports {' or '.join(forbidden)}: " + "; ".join(found)


def metadata_keys() -> set[str]:
    """The keys of ``metadata.json`` at every level, as ``digitserve.metadata`` reads and writes
    them (the fields of its ``Section`` models, ``.get`` reads, ``x[...]`` writes, dict literals)."""
    path = ROOT / "core" / "digitserve" / "metadata.py"
    keys: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute) and node.func.attr == "get" and node.args:
                keys |= _strings(node.args[:1])
        elif isinstance(node, ast.ClassDef) and "Section" in {ast.unparse(b) for b in node.bases}:
            keys |= {n.target.id for n in node.body
                     if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        elif isinstance(node, ast.Dict):
            keys |= _strings([k for k in node.keys if k is not None])
        elif isinstance(node, ast.Subscript):
            keys |= _strings([node.slice])
    return keys


def _strings(nodes: list[ast.expr]) -> set[str]:
    return {n.value for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str)}


# What holds a metadata document, by its name: `metadata`, `meta`, `doc(ument)`, the client's `info`.
_METADATA_HOLDER = re.compile(r"meta|doc|info", re.IGNORECASE)


def metadata_key_reads() -> list[str]:
    """Every ``x["key"]`` and ``x.get/pop/setdefault("key", ...)`` outside ``digitserve.metadata``
    where ``key`` is a key of ``metadata.json`` and ``x`` is named as a metadata document: a
    module reading or writing the document behind its schema's back."""
    keys = metadata_keys()
    found = []
    for name, path in _modules().items():
        if name == "digitserve.metadata":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Subscript):
                holder, key = node.value, node.slice
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in ("get", "pop", "setdefault") and node.args):
                holder, key = node.func.value, node.args[0]
            else:
                continue
            if (isinstance(key, ast.Constant) and key.value in keys
                    and _METADATA_HOLDER.search(ast.unparse(holder))):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    return found


def test_only_the_metadata_module_indexes_metadata_json_by_its_keys() -> None:
    keys = metadata_keys()
    assert {"version", "files", "sha256", "input", "size", "inference", "litert_file"} <= keys, keys
    found = metadata_key_reads()
    assert found == [], ("metadata.json indexed by its keys outside digitserve.metadata (use "
                         "Metadata's fields, or a helper there): " + "; ".join(found))


# What the data plane and the sources kept of a version's state before the model registry owned it.
VERSION_STATE = {"model", "refused", "refuse", "forgive", "labels", "set_labels", "loaded_versions",
                 "add_version", "set_model", "unload", "resolve", "canary_weight", "default_version"}
# The registry's state of a version, which only digitserve.server.registry assigns.
REGISTRY_STATE = {"served", "versions", "_labels", "_canary_weight", "state", "reason", "accuracy",
                  "refused_at", "gone_since", "read_hung"}


def state_assignments() -> list[str]:
    """Every assignment in the server outside the registry to an attribute (or an item of one)
    named as the registry's version state, on anything but ``self``."""
    found = []
    for name, path in _modules().items():
        if not _in(name, "digitserve.server") or name == "digitserve.server.registry":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            else:
                continue
            for target in targets:
                attribute = target.value if isinstance(target, ast.Subscript) else target
                if (isinstance(attribute, ast.Attribute) and attribute.attr in REGISTRY_STATE
                        and ast.unparse(attribute.value) != "self"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(target)}")
    return found


def test_the_registry_alone_holds_and_changes_a_version_s_state() -> None:
    from digitserve.server.dataplane import DataPlane
    from digitserve.server.versions import RepositorySource

    # The data plane runs what it is handed; the gate's verdicts and rules are not the source's.
    assert sorted(VERSION_STATE & set(dir(DataPlane))) == []
    source = RepositorySource(ROOT, "tiny")
    assert [a for a in ("accuracies", "rules") if hasattr(source, a)] == []
    found = state_assignments()
    assert found == [], "version state changed outside digitserve.server.registry: " + "; ".join(found)
