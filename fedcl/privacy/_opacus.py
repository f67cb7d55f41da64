"""Import Opacus without the root log handler it installs.

``opacus/utils/module_utils.py`` calls ``logging.basicConfig`` when imported. In a Flower process
that gives the root logger a handler, so every line of Flower's logger (and ours, ``flwr.fedcl``)
came out twice: once from Flower's console handler, once more, re-dated, from the root. Opacus is
imported here first (``fedcl/privacy/__init__.py`` imports this module before anything that uses
it) and the handlers its import added are taken off again; a handler the root had before stays.
"""

from __future__ import annotations

import importlib
import logging


def _import_opacus_without_its_root_handler() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    importlib.import_module("opacus.utils.module_utils")
    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)


_import_opacus_without_its_root_handler()
