"""digitserve: an MNIST model-serving service (trainer, server, client), one regular package.

Its parts live in the checkout's fixed folders (core/, protos/, server/, client/, trainer/), which
setuptools' package-dir maps into this one package when it is installed. Run from a checkout
(pytest, mypy, PYTHONPATH=core:protos:server:client:trainer), the package is this folder, and its
``__path__`` is extended with the same part of each sibling folder: only those, so a folder named
``digitserve`` elsewhere on sys.path (a clone beside a script) adds nothing to it.
"""

import os.path

_package = os.path.dirname(os.path.abspath(__file__))  # <checkout>/core/digitserve when not installed
_checkout = os.path.dirname(os.path.dirname(_package))
if os.path.basename(os.path.dirname(_package)) == "core" and os.path.isfile(
        os.path.join(_checkout, "pyproject.toml")):  # a checkout, not site-packages
    __path__ += [part for part in (os.path.join(_checkout, root, "digitserve")
                                   for root in ("protos", "server", "client", "trainer"))
                 if os.path.isdir(part)]
