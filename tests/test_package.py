"""``digitserve`` is a regular package (issue 22): a script that sits beside a folder named
``digitserve`` (a clone of this repository, as ``git clone`` names it) imports the real package,
and nothing from that folder, both from the checkout's source roots (as pytest and the server
processes import it), from a real install (pip through setuptools' package-dir) and from the
editable install ``make venv`` makes. A namespace package took the folder as one of its portions."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import sysconfig
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


def make_venv_options() -> list[str]:
    """The options ``make venv`` gives ``pip install -e '.[extras]'`` (its editable mode)."""
    makefile = (REPO_ROOT / "Makefile").read_text()
    line = re.search(r"pip install -q -e '\.\[[^\]]*\]'(.*)$", makefile, re.MULTILINE)
    assert line is not None, "make venv's install line"
    return shlex.split(line.group(1))


def installed(site: Path, editable: bool = False) -> Path:
    """This checkout's sources installed into ``site`` by pip from a copy (pip builds in the source
    tree): a wheel's layout, or ``editable`` as ``make venv`` installs them. Returns the copy."""
    source = site.parent / "source"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "pyproject.toml",
                            "README.md", "core", "protos", "server", "client", "trainer"],
                           cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((REPO_ROOT / name).read_bytes())
    how = ["-e", str(source), *make_venv_options()] if editable else [str(source)]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-compile", "--target", str(site), *how],
                   capture_output=True, text=True, check=True, timeout=300)
    return source


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


def test_make_venvs_editable_install_is_not_shadowed_and_keeps_edits_live(tmp_path: Path) -> None:
    """``make venv``'s ``pip install -e``: setuptools' default (lenient) editable finder comes after
    ``sys.path``, where a clone beside the script is found first (``cannot import name
    'DigitClient' from 'digitserve.client' (unknown location)``); strict mode puts a tree of links
    to the checkout's files on ``sys.path``, so the package is a regular one there and an edit of
    a source file is live."""
    script = clone_beside_a_script(tmp_path / "work")
    site = tmp_path / "site"
    source = installed(site, editable=True)
    # A venv's site-packages: after the script's own directory, its .pth files processed. Then the
    # running venv's, for the dependencies; -S keeps that one from coming first, since it may
    # hold this checkout's own install (make venv's link tree, which would be found instead).
    venv = sysconfig.get_paths()["purelib"]
    run = ["-S", "-c", f"import runpy, site; site.addsitedir({str(site)!r}); site.addsitedir({venv!r}); "
           f"runpy.run_path({str(script)!r}, run_name='__main__')"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, *run], cwd=script.parent, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["client"] == "digitserve.client.client"
    assert not [p for p in found["path"] if p.startswith(str(script.parent))], found["path"]
    assert not found["clone_tests"]
    assert Path(found["file"]).resolve() == source / "core" / "digitserve" / "__init__.py"
    with (source / "client" / "digitserve" / "client" / "errors.py").open("a") as edited:
        edited.write("\nEDITED_AFTER_THE_INSTALL = 1\n")
    script.write_text("from digitserve.client import errors\nprint(errors.EDITED_AFTER_THE_INSTALL)\n")
    edit = subprocess.run([sys.executable, *run], cwd=script.parent, capture_output=True, text=True,
                          timeout=120, env=env)
    assert (edit.returncode, edit.stdout) == (0, "1\n"), edit.stderr
