"""Which optional dependencies ("extras" of ``pyproject.toml``) a command needs, and the one line a
command prints when they are not installed.

``pip install digitserve`` installs the client; its three console scripts are always installed
(a wheel cannot make a script depend on an extra), so ``mnist-serve``, ``mnist-train train`` and
``mnist-client loadtest`` check their extra before importing anything from it, and exit 2 with one
line naming what to install instead of a ``ModuleNotFoundError`` traceback (so does
``mnist-client`` for ``--plot``, before it loads or evaluates anything). The line names both
installs: from the package index, and from a checkout (``make venv``'s editable install), where
``digitserve[extra]`` would not find this project.
"""

from __future__ import annotations

import importlib.util

# The top-level modules each extra provides, as pyproject.toml's [project.optional-dependencies]
# lists them (tests/core/test_extras.py keeps the two in step).
# ``mnist-serve`` needs ``serve`` (no TensorFlow: it serves LiteRT flatbuffers, and refuses a
# version that needs TensorFlow with a line naming ``server``, which adds it).
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


def requirement_error(prog: str, extra: str, what: str) -> str | None:
    """The one line ``prog`` prints when ``extra`` is not installed, else None."""
    absent = missing(extra)
    if not absent:
        return None
    return (f"{prog}: error: {what} needs the '{extra}' extra, which is not installed (missing: "
            f"{', '.join(absent)}); install it with: pip install 'digitserve[{extra}]' (from a "
            f"checkout: pip install -e '.[{extra}]')")
