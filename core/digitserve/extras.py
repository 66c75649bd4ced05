"""Which optional dependencies ("extras" of ``pyproject.toml``) a command needs, and the one line it
prints (exit 2) when they are not installed: the console scripts are always installed (a wheel
cannot make a script depend on an extra), so each checks its extra before importing from it, and
names both installs (the package index's, and a checkout's editable one)."""

from __future__ import annotations

import importlib.util

# The top-level modules of each extra in pyproject.toml (tests/core/test_extras.py keeps them in
# step). ``serve`` has no TensorFlow: it serves LiteRT flatbuffers; ``server`` adds TensorFlow.
MODULES: dict[str, tuple[str, ...]] = {
    "serve": ("grpc_reflection", "prometheus_client", "cryptography", "aiohttp", "orjson", "pydantic"),
    "server": ("tensorflow", "grpc_reflection", "prometheus_client", "cryptography", "aiohttp",
               "orjson", "pydantic"),
    "trainer": ("tensorflow", "sklearn", "matplotlib"),
    "plot": ("matplotlib",),
    "loadtest": ("hpack",),
}


# Where a version that needs TensorFlow can be served, for the lines of a server without it.
WITH_TENSORFLOW = ("the digitserve-train image (docker build --target train .), or an install of "
                   "digitserve[server]")


def available(module: str) -> bool:
    """Whether ``module`` (a top-level name) can be imported here, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder that refuses it; a module half-imported
        return False


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (found, not imported: no cost)."""
    return [name for name in MODULES[extra] if not available(name)]


def requirement_error(prog: str, extra: str, what: str, kind: str = "error") -> str | None:
    """The one line ``prog`` prints when ``extra`` is not installed, else None; ``kind`` is its
    word after the name ("note" beside a help that still works)."""
    if not (absent := missing(extra)):
        return None
    return (f"{prog}: {kind}: {what} needs the '{extra}' extra, which is not installed (missing: "
            f"{', '.join(absent)}); install it with: pip install 'digitserve[{extra}]' (from a "
            f"checkout: pip install -e '.[{extra}]')")
