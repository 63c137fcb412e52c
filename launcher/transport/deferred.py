"""Imports put off until used: paramiko's optional `invoke`.

Run from launcher/__init__.py, so it happens before anything of macrun imports paramiko, whatever the entry
point (the `macrun` command, wizard.py, the Python API).
"""

from __future__ import annotations

import sys
from typing import Any


def defer_invoke() -> None:
    """Load `invoke` when first used, not with paramiko.

    paramiko imports it (and with it unittest.mock, argparse, ...) only to run ssh_config's `Match exec`
    lines; that import was a fifth of the CPU of a whole `macrun run --hosts` launch (0.1 of 0.5 s, lab,
    benchmarks/launch.py). A stand-in module takes its place and imports the real one on the first
    attribute asked of it, so `Match exec` still works. (importlib's LazyLoader does not do here: the
    import statement itself reads the module's `__spec__`, which loads it.)
    """
    if "invoke" in sys.modules or "paramiko" in sys.modules:
        return
    import importlib
    import importlib.util
    import types

    try:
        if importlib.util.find_spec("invoke") is None:
            return
    except (ImportError, ValueError):
        return
    stand_in = types.ModuleType("invoke", "Stands in for invoke until first used (launcher/transport/deferred.py).")

    def load(name: str) -> Any:
        if sys.modules.get("invoke") is stand_in:
            del sys.modules["invoke"]
        return getattr(importlib.import_module("invoke"), name)

    stand_in.__getattr__ = load  # type: ignore[method-assign]
    sys.modules["invoke"] = stand_in
