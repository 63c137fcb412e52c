"""What the probe learnt by importing MLX on each host, kept between launches while the install is unchanged.

Importing `mlx.core` is most of a probe's time (about 0.2 s of 0.26 s in the lab) and its answer (MLX's
version and device) changes only when the host's Python or MLX is reinstalled. The probe reports a
fingerprint of both (sizes and mtimes of the interpreter and of MLX's package files: no import needed);
when it matches the one cached here for the same host, interpreter and probe script, the probe
skips the import and the launcher uses the cached answer. Everything else (memory, disk, battery, links)
is probed on every launch. The cache is one JSON file; a damaged one is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from launcher.room.jsoncache import cache_file, read_cache, write_cache

_LOCK = threading.Lock()


def cache_path() -> Path:
    return cache_file("probe.json")


def cache_key(host_label: str, python: str, probe_script: bytes) -> str:
    """One entry per SSH target, interpreter and probe script (another macrun's probe may report more)."""
    return f"{hashlib.sha256(probe_script).hexdigest()[:16]}|{host_label}|{python}"


def lookup(key: str) -> tuple[str | None, dict[str, Any] | None]:
    """(fingerprint, cached MLX answer) for `key`, or (None, None)."""
    entry = read_cache(cache_path()).get(key)
    if not isinstance(entry, dict) or not isinstance(entry.get("mlx"), dict):
        return None, None
    fingerprint = entry.get("fingerprint")
    return (fingerprint, entry["mlx"]) if isinstance(fingerprint, str) else (None, None)


def store(updates: Mapping[str, tuple[str, Mapping[str, Any]]]) -> None:
    """Record {key: (fingerprint, MLX answer)}; written atomically, never raising (a cache is optional)."""
    if not updates:
        return
    with _LOCK:
        data = read_cache(cache_path())
        for key, (fingerprint, mlx) in updates.items():
            data[key] = {"fingerprint": fingerprint, "mlx": dict(mlx)}
        write_cache(cache_path(), data)
