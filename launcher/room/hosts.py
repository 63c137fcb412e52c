"""The hosts file: load, save and lay out ranks over `hosts.json` or MLX's hostfile (validation: hosts_parse).

macrun's format (hosts.example.json documents every field)::

    {"defaults": {"user": "ada", "python": "/opt/homebrew/bin/python3"},
     "hosts": [{"name": "studio", "host": "192.168.1.20", "slots": 2}, {"host": "mbp.local"},
               {"ssh": "lab-mini"}]}

MLX's format, what `mlx.launch --hostfile` reads, is a list with one entry per rank,
`[{"ssh": "studio.local", "ips": ["192.168.1.20"]}, ...]` (newer MLX also nests it under "hosts" beside
"backend" and "envs"). It is read as well: consecutive entries for one host become one HostSpec with
that many slots, so a file written by `write_mlx_hostfile` reads back to the same hosts.

Every problem is a HostsError with a one-line message naming the file, the entry and the field, and a
hint that says what to do. Keys starting with "_" ("_doc", "_comment") are ignored wherever they appear:
JSON has no comments, and that is how the example file carries its documentation.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from distributed.errors import HostsError
from launcher.room.hosts_parse import (
    _BUILTIN,
    DEFAULT_FIELDS,
    ENTRY_FIELDS,
    _fail,
    _is_mlx_object,
    _parse_ours,
    _read_json,
    load_hosts,
    parse_hosts,
)
from launcher.room.hostspec import HostSpec, RankSlot

__all__ = ["DEFAULT_FIELDS", "ENTRY_FIELDS", "HostSpec", "RankSlot", "layout_ranks", "load_hosts", "local_hosts",
           "parse_hosts", "save_hosts", "to_json", "write_atomic", "write_mlx_hostfile"]


def _short_home(path: str | None) -> str | None:
    """Write key paths under the home folder as ~/..., so the file works for the same user elsewhere."""
    if path is None:
        return None
    home = os.path.expanduser("~")
    return "~" + path[len(home):] if home not in ("", "/") and path.startswith(home + os.sep) else path


def _entry(spec: HostSpec, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """One host as macrun's JSON, leaving out what the file's defaults (or macrun's) already give it."""
    out: dict[str, Any] = {} if spec.name == spec.hostname else {"name": spec.name}
    out["host"] = spec.hostname
    base = {**_BUILTIN, **defaults}
    values = {"user": spec.user, "port": spec.port, "identity_file": spec.key_file, "python": spec.python,
              "workdir": spec.workdir, "slots": spec.slots, "ips": spec.ips, "fast_ips": spec.fast_ips,
              "labels": spec.labels}
    for key, value in values.items():
        if value != base[key]:
            out[key] = _short_home(value) if key == "identity_file" else (
                list(value) if isinstance(value, tuple) else value)
    return out


def to_json(hosts: Sequence[HostSpec]) -> dict[str, Any]:
    """macrun's format for `hosts`, without defaults (each entry states what differs from macrun's own)."""
    return {"hosts": [_entry(spec, {}) for spec in hosts]}


def write_atomic(path: Path, text: str) -> None:
    """Write a temp file in the same folder and rename it over `path`: no reader sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_hosts(path: str | Path, hosts: Sequence[HostSpec]) -> None:
    """Add `hosts` to macrun's hosts file at `path`, atomically, never dropping an entry already there.

    An entry with the same name as a given host is replaced (its "_" notes kept); the others, the
    defaults and the documentation keys stay as they were. The merged file is validated before it
    replaces the old one, so a bad merge raises HostsError and leaves the file untouched.
    """
    path = Path(path)
    source, doc, defaults, existing = str(path), {}, {}, []
    if path.exists() and (path.is_dir() or path.read_bytes().strip()):
        data = _read_json(path)
        if not isinstance(data, Mapping) or _is_mlx_object(data):
            _fail(source, "is an MLX hostfile; macrun's hosts file is saved in macrun's own format",
                  "save to another path, e.g. hosts.json (macrun reads both formats)")
        defaults, existing = _parse_ours(data, source, path.parent, check_files=False)
        doc = dict(data)
    entries: list[Any] = list(doc.get("hosts", []))
    index = {spec.name.lower(): i for i, spec in enumerate(existing)}
    for spec in hosts:
        new = _entry(spec, defaults)
        i = index.get(spec.name.lower())
        if i is None:
            index[spec.name.lower()] = len(entries)
            entries.append(new)
            continue
        old = entries[i]
        if "ssh" in old and old["ssh"] == spec.hostname:  # it was an ssh_config alias: keep saying so
            new = {("ssh" if k == "host" else k): v for k, v in new.items()}
        entries[i] = {**{k: v for k, v in old.items() if k.startswith("_")}, **new}
    doc["hosts"] = entries
    parse_hosts(doc, source, base_dir=path.parent, check_files=False)
    write_atomic(path, json.dumps(doc, indent=2) + "\n")


def write_mlx_hostfile(hosts: Sequence[HostSpec], path: Path) -> None:
    """Write `hosts` as MLX's hostfile (`mlx.launch --hostfile`): one entry per rank, in rank order.

    "ips" are the host's ips, else its hostname when that is an IP address, else left out (MLX then
    resolves the name). MLX's format has no port, so a non-default port must come from ~/.ssh/config.
    """
    if not hosts:
        raise HostsError(f"{path}: no hosts to write", hint="pass at least one host")
    out: list[dict[str, Any]] = []
    for spec in hosts:
        entry: dict[str, Any] = {"ssh": f"{spec.user}@{spec.hostname}" if spec.user else spec.hostname}
        ips = list(spec.ips) or ([spec.hostname] if _is_ip(spec.hostname) else [])
        if ips:
            entry["ips"] = ips
        out.extend(dict(entry) for _ in range(spec.slots))
    write_atomic(Path(path), json.dumps(out, indent=2) + "\n")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def layout_ranks(hosts: Sequence[HostSpec]) -> list[RankSlot]:
    """Number the ranks host by host in file order: host 0 gets ranks 0..slots-1, the next host the next ones.

    Keeping a host's ranks contiguous is what lets LOCAL_RANK and the ring's neighbours follow the file.
    """
    slots: list[RankSlot] = []
    for host in hosts:
        first = len(slots)
        slots.extend(RankSlot(rank=first + i, host=host, local_rank=i, local_world_size=host.slots)
                     for i in range(host.slots))
    return slots


def local_hosts(nproc: int) -> list[HostSpec]:
    """The stand-in hosts list for a run without a hosts file: `nproc` ranks on this machine.

    Its python is this interpreter, which is the one known to have MLX and macrun.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise HostsError(f"--nproc must be a positive integer, got {nproc!r}", hint="e.g. --nproc 2")
    return [HostSpec(name="localhost", hostname="127.0.0.1", python=sys.executable, slots=nproc,
                     ips=("127.0.0.1",))]
