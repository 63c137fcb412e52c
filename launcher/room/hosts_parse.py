"""Reading and validating hosts files (macrun's format and MLX's hostfile); see launcher.room.hosts for both formats.

Every problem is a HostsError with a one-line message naming the file, the entry and the field, and a hint.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from distributed.config_file import parse_int
from distributed.errors import HostsError
from launcher.room.hostspec import HostSpec

ENTRY_FIELDS = ("name", "host", "ssh", "user", "port", "identity_file", "python", "workdir", "slots",
                "ips", "fast_ips", "labels")
DEFAULT_FIELDS = ("user", "port", "identity_file", "python", "workdir", "slots", "labels")
TOP_FIELDS = ("defaults", "hosts")
MLX_ENTRY_FIELDS = ("ssh", "ips", "rdma")
# Names people reach for out of habit (ssh_config, Ansible, MLX); difflib would not find most of them.
_ALIASES = {"hostname": "host", "address": "host", "key_file": "identity_file", "key": "identity_file",
            "identityfile": "identity_file", "username": "user", "ip": "ips", "addresses": "ips",
            "label": "labels", "tags": "labels", "interpreter": "python", "dir": "workdir", "nproc": "slots"}
_BUILTIN = {"user": None, "port": None, "identity_file": None, "python": "python3", "workdir": "~/.macrun",
            "slots": 1, "ips": (), "fast_ips": (), "labels": ()}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")
_HOST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\Z")
_EXAMPLE_HINT = 'see hosts.example.json, which documents every field'


class _Object(dict):  # type: ignore[type-arg]
    """A JSON object that remembers the keys written twice (json keeps the last one, silently)."""

    repeated: list[str]


def _pairs(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object()
    obj.repeated = []
    for key, value in pairs:
        if key in obj:
            obj.repeated.append(key)
        obj[key] = value
    return obj


def _got(value: Any) -> str:
    """The offending value as the user wrote it (JSON spelling), cut short; never raises."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        try:
            text = repr(value)
        except (ValueError, RecursionError):  # an int past Python's 4,300-digit limit, or deep nesting
            text = "(too large to print)"
    return text if len(text) <= 48 else text[:45] + "..."


def _fail(where: str, problem: str, hint: str) -> NoReturn:
    raise HostsError(f"{where}: {problem}", hint=hint)


def _check_keys(where: str, obj: Mapping[str, Any], allowed: Sequence[str], what: str) -> None:
    for key in getattr(obj, "repeated", ()):
        _fail(where, f'field "{key}" is written twice', "keep one of them: JSON silently keeps only the last")
    for key in obj:
        if isinstance(key, str) and key.startswith("_"):
            continue
        if key not in allowed:
            guess = _ALIASES.get(str(key).lower()) or next(
                iter(difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)), None)
            hint = f'did you mean "{guess}"?' if guess else f"{what} fields are: {', '.join(allowed)}"
            _fail(where, f'unknown field "{key}"', f"{hint} (notes go in keys starting with \"_\")")


def _string(where: str, key: str, value: Any, *, spaces: bool = False) -> str:
    if not isinstance(value, str) or not value.strip():
        _fail(where, f'field "{key}" must be a non-empty string, got {_got(value)}',
              f'write it in double quotes, e.g. "{key}": "{_BUILTIN.get(key) or "..."}"')
    if "\n" in value or "\r" in value or (not spaces and any(c.isspace() for c in value)):
        bad = "line breaks" if spaces else "spaces"
        _fail(where, f'field "{key}" must not contain {bad}, got {_got(value)}', f"remove the {bad}")
    return value


def _address(where: str, key: str, value: Any) -> str:
    """A host name, IP literal or ~/.ssh/config alias: what SSH connects to."""
    value = _string(where, key, value)
    if "@" in value:
        user, _, host = value.rpartition("@")
        _fail(where, f'field "{key}" must not contain a user name, got {_got(value)}',
              f'put the user in its own field: "{key}": "{host}", "user": "{user}"')
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if ":" in value:
        host, _, port = value.rpartition(":")
        _fail(where, f'field "{key}" must not contain a port, got {_got(value)}',
              f'put the port in its own field: "{key}": "{host}", "port": {port}')
    if not _HOST_RE.match(value):
        _fail(where, f'field "{key}" must be a host name or IP address, got {_got(value)}',
              "use letters, digits, '.', '-' and '_' only, e.g. \"studio.local\" or \"192.168.1.20\"")
    return value


def _int(where: str, key: str, value: Any, lo: int, hi: int | None, what: str) -> int:
    # bool is an int in Python; `true` for a port or slot count is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        example = 22 if key == "port" else 2
        _fail(where, f'field "{key}" must be {what}, got {_got(value)}',
              f'write a whole number without quotes, e.g. "{key}": {example}')
    return value


def _ipv4s(where: str, key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        _fail(where, f'field "{key}" must be a list of IPv4 addresses, got {_got(value)}',
              f'wrap it in brackets: "{key}": [{_got(value)}]')
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _fail(where, f'field "{key}" must be a list of IPv4 address strings, got {_got(value)}',
              f'e.g. "{key}": ["192.168.1.20"]')
    for text in value:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            _fail(where, f'field "{key}" has an invalid IP address {_got(text)}',
                  "write four numbers 0-255 separated by dots, e.g. 192.168.1.20")
        if ip.version != 4:
            _fail(where, f'field "{key}" has an IPv6 address {_got(text)}; only IPv4 is supported',
                  "give the host's IPv4 address on that network (ifconfig / ip -4 addr shows it)")
        if ip.is_unspecified or ip.is_multicast or text == "255.255.255.255":
            _fail(where, f'field "{key}" has {_got(text)}, which no host can be reached at',
                  "give the address of one of the host's interfaces")
    if len(set(value)) != len(value):
        _fail(where, f'field "{key}" lists an address twice, got {_got(value)}', "list each address once")
    return tuple(value)


def _labels(where: str, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        _fail(where, f'field "{key}" must be a list of non-empty strings, got {_got(value)}',
              f'e.g. "{key}": ["m2-ultra", "desk"]')
    return tuple(value)


def _key_file(where: str, key: str, value: Any, base_dir: Path, check_files: bool) -> str:
    path = Path(os.path.expanduser(_string(where, key, value, spaces=True)))
    path = path if path.is_absolute() else base_dir / path
    if check_files and not path.is_file():
        _fail(where, f'field "{key}" names {_got(value)}, which is not a file on this machine ({path})',
              "give the path of your private key (e.g. ~/.ssh/id_ed25519), or drop the field to use "
              "ssh-agent and ~/.ssh/config")
    return str(path)


def _field(where: str, key: str, value: Any, base_dir: Path, check_files: bool) -> Any:
    """Check one field of an entry or of defaults; return it as HostSpec holds it (None: unset)."""
    if value is None and key in ("user", "port", "identity_file"):
        return None  # an explicit null means "leave it to ~/.ssh/config", even over a default
    if key in ("host", "ssh"):
        return _address(where, key, value)
    if key == "name":
        value = _string(where, key, value)
        if not _NAME_RE.match(value):
            _fail(where, f'field "name" must be 1-63 letters, digits, ".", "-" or "_", got {_got(value)}',
                  'names appear in log prefixes and folder names: e.g. "studio" or "mini-2"')
        return value
    if key == "user":
        return _string(where, key, value)
    if key in ("python", "workdir"):
        return _string(where, key, value, spaces=True)
    if key == "port":
        return _int(where, key, value, 1, 65535, "an integer from 1 to 65535")
    if key == "slots":
        return _int(where, key, value, 1, None, "a positive integer")
    if key in ("ips", "fast_ips"):
        return _ipv4s(where, key, value)
    if key == "labels":
        return _labels(where, key, value)
    if key == "identity_file":
        return _key_file(where, key, value, base_dir, check_files)
    raise AssertionError(key)  # _check_keys let through a field this function does not know


def _spec(values: Mapping[str, Any]) -> HostSpec:
    renamed = {"identity_file": "key_file"}
    return HostSpec(**{renamed.get(k, k): v for k, v in values.items()})


def _label(index: str, entry: Any) -> str:
    if isinstance(entry, Mapping):
        for key in ("name", "host", "ssh"):
            if isinstance(entry.get(key), str):
                return f"{index} ({_got(entry[key])})"
    return index


def _check_unique(source: str, specs: Sequence[HostSpec], labels: Sequence[str], mlx: bool) -> None:
    names: dict[str, int] = {}
    targets: dict[tuple[str, int], int] = {}
    for i, spec in enumerate(specs):
        first = names.setdefault(spec.name.lower(), i)
        if first != i:
            if mlx:
                _fail(f"{source}: {labels[i]}", f'field "ssh" {_got(spec.hostname)} already appeared at '
                      f"{labels[first]}", "list all of a host's entries next to each other (one per rank)")
            _fail(f"{source}: {labels[i]}", f'field "name" {_got(spec.name)} is already used by '
                  f"{labels[first]}", 'give each entry its own "name" (default: the host), or use "slots"')
        first = targets.setdefault((spec.hostname.lower(), spec.port or 22), i)
        if first != i:
            _fail(f"{source}: {labels[i]}", f'field "host" {_got(spec.hostname)} port {spec.port or 22} '
                  f"is the same machine as {labels[first]}",
                  'list each machine once and set "slots" for several ranks')


def _parse_ours(data: Mapping[str, Any], source: str, base_dir: Path,
                check_files: bool) -> tuple[dict[str, Any], list[HostSpec]]:
    """macrun's format: return the checked defaults and one HostSpec per entry."""
    _check_keys(source, data, TOP_FIELDS, "top-level")
    raw_defaults = data.get("defaults", {})
    if not isinstance(raw_defaults, Mapping):
        _fail(f"{source}: defaults", f"must be an object, got {_got(raw_defaults)}",
              'e.g. "defaults": {"user": "ada", "slots": 1}')
    where = f"{source}: defaults"
    for key in raw_defaults:
        if key in ENTRY_FIELDS and key not in DEFAULT_FIELDS:
            _fail(where, f'field "{key}" cannot be a default', f'set "{key}" on each host instead')
    _check_keys(where, raw_defaults, DEFAULT_FIELDS, "defaults")
    defaults = {k: _field(where, k, v, base_dir, check_files)
                for k, v in raw_defaults.items() if not k.startswith("_")}
    if "hosts" not in data:
        _fail(source, 'field "hosts" is missing', 'add "hosts": [{"host": "studio.local"}]')
    entries = data["hosts"]
    if not isinstance(entries, list) or not entries:
        _fail(source, f'field "hosts" must be a non-empty list of hosts, got {_got(entries)}',
              'e.g. "hosts": [{"host": "studio.local"}, {"host": "mbp.local"}]')
    specs, labels = [], []
    for i, entry in enumerate(entries):
        label = _label(f"hosts[{i}]", entry)
        where = f"{source}: {label}"
        if not isinstance(entry, Mapping):
            host = _got(entry) if isinstance(entry, str) else '"mbp.local"'
            _fail(where, f"must be an object, got {_got(entry)}", f'write {{"host": {host}}}')
        _check_keys(where, entry, ENTRY_FIELDS, "host")
        if ("host" in entry) == ("ssh" in entry):
            both = ", got both" if "host" in entry else ""
            _fail(where, f'needs exactly one of field "host" and field "ssh"{both}',
                  '"host": an address or DNS name; "ssh": an alias from ~/.ssh/config')
        values = dict(defaults)
        values.update({k: _field(where, k, v, base_dir, check_files)
                       for k, v in entry.items() if not k.startswith("_")})
        values["hostname"] = values.pop("host", None) or values.pop("ssh")
        values.setdefault("name", values["hostname"])
        if not _NAME_RE.match(values["name"]):
            _fail(where, f'field "name" (taken from the host) is not a valid name: {_got(values["name"])}',
                  'set "name" to 1-63 letters, digits, ".", "-" or "_"')
        specs.append(_spec(values))
        labels.append(label)
    _check_unique(source, specs, labels, mlx=False)
    return defaults, specs


def _parse_mlx(entries: Any, source: str, prefix: str) -> list[HostSpec]:
    """MLX's format: one {"ssh", "ips"} entry per rank; consecutive entries of one host become its slots."""
    if not isinstance(entries, list) or not entries:
        _fail(source, f"an MLX hostfile must be a non-empty list of hosts, got {_got(entries)}",
              'e.g. [{"ssh": "studio.local", "ips": ["192.168.1.20"]}]')
    specs: list[HostSpec] = []
    labels: list[str] = []
    for i, entry in enumerate(entries):
        label = _label(f"{prefix}[{i}]", entry)
        where = f"{source}: {label}"
        if not isinstance(entry, Mapping):
            _fail(where, f"must be an object, got {_got(entry)}", 'e.g. {"ssh": "studio.local", "ips": []}')
        _check_keys(where, entry, MLX_ENTRY_FIELDS, "MLX hostfile")
        if "ssh" not in entry:
            _fail(where, 'field "ssh" is missing', 'MLX hostfile entries look like {"ssh": "studio.local"}')
        target = _string(where, "ssh", entry["ssh"])
        user, _, host = target.rpartition("@")  # MLX hands "ssh" to the ssh command, so user@host is valid
        host = _address(where, "ssh", host)
        ips = _ipv4s(where, "ips", entry.get("ips", []))
        spec = HostSpec(name=host, hostname=host, user=_string(where, "ssh", user) if user else None, ips=ips)
        if specs and _same_host(specs[-1], spec):
            specs[-1] = replace(specs[-1], slots=specs[-1].slots + 1)
            continue
        specs.append(spec)
        labels.append(label)
    _check_unique(source, specs, labels, mlx=True)
    return specs


def _same_host(a: HostSpec, b: HostSpec) -> bool:
    return (a.hostname, a.user, a.ips) == (b.hostname, b.user, b.ips)


def _is_mlx_object(data: Mapping[str, Any]) -> bool:
    return "backend" in data or "envs" in data


def parse_hosts(data: object, source: str, *, base_dir: Path | None = None,
                check_files: bool = True) -> list[HostSpec]:
    """Validate an already-decoded hosts file (`source` names it in errors) and return its hosts.

    A list is MLX's hostfile; an object is macrun's format (or MLX's newer object form, recognised by its
    "backend"/"envs" keys). A relative identity_file is taken relative to `base_dir` (default: the current
    directory); `check_files=False` skips checking that it exists (e.g. to show a file from another machine).
    """
    base = base_dir if base_dir is not None else Path.cwd()
    if isinstance(data, list):
        return _parse_mlx(data, source, "entry ")
    if isinstance(data, Mapping):
        if _is_mlx_object(data):
            return _parse_mlx(data.get("hosts"), source, "hosts")
        return _parse_ours(data, source, base, check_files)[1]
    _fail(source, f'must be an object with "hosts" (macrun\'s format) or a list (MLX\'s hostfile), '
          f"got {_got(data)}", _EXAMPLE_HINT)


def _read_json(path: Path) -> Any:
    source = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        _fail(source, "hosts file not found", "check the path, or copy hosts.example.json and edit it")
    except IsADirectoryError:
        _fail(source, "is a directory, not a hosts file", "give the path of the JSON file itself")
    except OSError as exc:
        _fail(source, f"cannot be read: {exc.strerror or exc}", "check the file's permissions")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        _fail(source, f"is not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start})",
              "save it as UTF-8 (plain text) JSON")
    if not text.strip():
        _fail(source, "is empty", 'it needs at least {"hosts": [{"host": "..."}]}; ' + _EXAMPLE_HINT)
    try:
        return json.loads(text, object_pairs_hook=_pairs, parse_int=parse_int)
    except RecursionError:
        _fail(source, "is nested too deeply to be a hosts file (lists or objects inside each other over and "
              "over)", 'a hosts file is {"hosts": [{"host": ...}, ...]}, two levels deep; ' + _EXAMPLE_HINT)
    except json.JSONDecodeError as exc:
        line = text.splitlines()[exc.lineno - 1].strip() if exc.lineno <= len(text.splitlines()) else ""
        before = text[: exc.pos].rstrip()
        if line.startswith(("//", "#", "/*")):
            hint = 'JSON has no comments: put notes in a "_comment" key, which macrun ignores'
        elif before.endswith(",") and text[exc.pos: exc.pos + 1] in "]}":
            hint = "remove the comma after the last item: JSON allows none"
        else:
            hint = "keys and strings need double quotes, items need commas between them, none after the last"
        _fail(source, f"is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}", hint)


def load_hosts(path: str | Path, *, check_files: bool = True) -> list[HostSpec]:
    """Read, validate and default a hosts file (macrun's format or MLX's hostfile); raise HostsError."""
    path = Path(path)
    return parse_hosts(_read_json(path), str(path), base_dir=path.parent, check_files=check_files)
