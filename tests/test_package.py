"""``digitserve`` is a regular package (issue 22): a script that sits beside a folder named
``digitserve`` (a clone of this repository, as ``git clone`` names it) imports the real package,
and nothing from that folder, both from the checkout's source roots (as pytest and the server
processes import it) and from a real install (pip through setuptools' package-dir). A namespace
package took the folder as one of its portions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

SCRIPT = """\
import importlib.util, json
from digitserve.client import DigitClient
import digitserve
print(json.dumps({"file": digitserve.__file__, "path": list(digitserve.__path__),
                  "client": DigitClient.__module__,
                  "clone_tests": importlib.util.find_spec("digitserve.tests") is not None}))
"""


def clone_beside_a_script(where: Path) -> Path:
    """``where/digitserve``, laid out as a clone of this repository (its top-level folders, and
    the ``tests`` package), and ``where/script.py`` beside it; returns the script."""
    clone = where / "digitserve"
    for folder in ("core/digitserve", "protos/digitserve", "server/digitserve/server",
                   "client/digitserve/client", "trainer", "bench", "docs", "tests"):
        (clone / folder).mkdir(parents=True)
    (clone / "tests" / "__init__.py").write_text("")
    script = where / "script.py"
    script.write_text(SCRIPT)
    return script


def installed(site: Path) -> None:
    """This checkout's sources installed into ``site`` by pip (a wheel's layout), from a copy:
    pip builds in the source tree."""
    source = site.parent / "source"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "pyproject.toml",
                            "README.md", "core", "protos", "server", "client", "trainer"],
                           cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((REPO_ROOT / name).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-compile", "--target", str(site), str(source)],
                   capture_output=True, text=True, check=True, timeout=300)


@pytest.mark.parametrize("mode", ["checkout", "installed"])
def test_a_folder_named_digitserve_beside_a_script_does_not_shadow_the_package(
        mode: str, tmp_path: Path) -> None:
    script = clone_beside_a_script(tmp_path / "work")
    if mode == "checkout":  # the source roots, as tests/conftest.py gives every process
        package = REPO_ROOT / "core" / "digitserve"
        path = os.environ["PYTHONPATH"]
    else:
        installed(tmp_path / "site")
        package, path = tmp_path / "site" / "digitserve", str(tmp_path / "site")
    done = subprocess.run([sys.executable, str(script)], cwd=script.parent, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": path})
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["client"] == "digitserve.client.client"
    assert found["file"] == str(package / "__init__.py")  # a regular package: it has a file
    assert found["path"][0] == str(package)
    assert not [p for p in found["path"] if p.startswith(str(script.parent))], found["path"]
    assert not found["clone_tests"]  # nothing of the clone imports as digitserve.*
    if mode == "installed":
        assert found["path"] == [str(package)]
    else:  # the checkout's other source roots, and only those
        assert found["path"][1:] == [str(REPO_ROOT / root / "digitserve")
                                     for root in ("protos", "server", "client", "trainer")]
