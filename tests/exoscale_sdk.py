"""Exoscale's own Python SDK (`exoscale.api.v2.Client`), imported past the project's root `exoscale.py`
(which shadows the `exoscale` package whenever the project root is on sys.path, as it is in the tests)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def sdk() -> ModuleType:
    """The `exoscale.api.v2` module of the installed SDK."""
    mod = sys.modules.get("exoscale.api.v2")
    if mod is not None:
        return mod
    shadow = sys.modules.pop("exoscale", None)
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and Path(p).resolve() != ROOT]
    try:
        mod = importlib.import_module("exoscale.api.v2")
    finally:
        sys.path[:] = saved
        sdk_package = sys.modules.pop("exoscale", None)
        if shadow is not None:
            sys.modules["exoscale"] = shadow
        del sdk_package  # submodules stay importable by their full names from sys.modules
    return mod


def client(key: str, secret: str, endpoint: str):
    return sdk().Client(key, secret, url=endpoint)


def exceptions() -> ModuleType:
    sdk()
    return sys.modules["exoscale.api.exceptions"]
