"""Read and append OpenSSH known_hosts files, tolerating whatever else the file holds.

paramiko's HostKeys raises on `@cert-authority` and `@revoked` lines, which made every connection fail
for people whose file has one. This reader understands what OpenSSH documents in sshd(8) "SSH_KNOWN_HOSTS
FILE FORMAT": plain names, `[host]:port`, comma lists, `*`/`?` wildcards, `!negations`, hashed names
(`|1|salt|HMAC-SHA1(salt, name)`) and `@revoked`. `@cert-authority` (host certificates) is not supported:
such lines are skipped with a note, as are lines it cannot read. It never raises on a file's content.
Pure Python (no paramiko): keys are compared as their wire-format blobs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import shlex
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from distributed.errors import HostError

log = logging.getLogger("macrun.known_hosts")

# ssh-keygen's names for key types, as `ssh-keygen -lf` prints them.
_KIND = {"ssh-ed25519": "ED25519", "ssh-rsa": "RSA", "ssh-dss": "DSA", "sk-ssh-ed25519@openssh.com": "ED25519-SK",
         "sk-ecdsa-sha2-nistp256@openssh.com": "ECDSA-SK"}
_noted: set[tuple[str, int, str]] = set()
_noted_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class KnownKey:
    """One key line of a known_hosts file."""

    key_type: str  # as the line names it, e.g. "ssh-ed25519"
    blob: bytes  # the key in SSH wire format (the base64 field, decoded)
    path: Path
    line: int  # 1-based
    revoked: bool = False

    @property
    def where(self) -> str:
        return f"{self.path} line {self.line}"


@dataclass(frozen=True, slots=True)
class HostKeys:
    """What the known_hosts files say about one host name: its keys and every revoked key that applies."""

    name: str
    keys: tuple[KnownKey, ...] = ()
    revoked: tuple[KnownKey, ...] = field(default=())

    def __bool__(self) -> bool:
        return bool(self.keys)

    def key_types(self) -> list[str]:
        """The key types on file for the host, first seen first, without repeats."""
        return list(dict.fromkeys(k.key_type for k in self.keys))

    def find(self, blob: bytes) -> KnownKey | None:
        return next((k for k in self.keys if k.blob == blob), None)

    def find_revoked(self, blob: bytes) -> KnownKey | None:
        return next((k for k in self.revoked if k.blob == blob), None)


def fingerprint(blob: bytes) -> str:
    """`SHA256:…` exactly as `ssh-keygen -lf` prints it (unpadded base64 of the key blob's SHA-256)."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def describe(key_type: str, blob: bytes) -> str:
    """`ED25519 SHA256:…`: the key type as ssh-keygen names it, then its fingerprint."""
    kind = "ECDSA" if key_type.startswith("ecdsa-") else _KIND.get(key_type, key_type)
    return f"{kind} {fingerprint(blob)}"


def host_name(hostname: str, port: int) -> str:
    """The name OpenSSH files a host's key under: `host`, or `[host]:port` off port 22."""
    return hostname if port == 22 else f"[{hostname}]:{port}"


def lookup(paths: Iterable[Path], name: str) -> HostKeys:
    """Every key and every revoked key for `name` (as `host_name` writes it) in the files that exist."""
    keys: list[KnownKey] = []
    revoked: list[KnownKey] = []
    for path in paths:
        for patterns, key in _entries(path):
            if key.revoked and _matches(patterns, name):
                revoked.append(key)
            elif _matches(patterns, name):
                keys.append(key)
    return HostKeys(name, tuple(keys), tuple(revoked))


def verify(known: HostKeys, key_type: str, blob: bytes, *, where: str, host: str) -> bool:
    """True if the offered key is on file, False if the host is unknown; HostError if the key is revoked
    or the file holds other keys for the host (the caller decides what an unknown host means)."""
    revoked = known.find_revoked(blob)
    if revoked is not None:
        raise HostError(f"the host key of {where} is REVOKED: {revoked.where} marks {describe(key_type, blob)} "
                        "@revoked; refusing to connect",
                        hint=f"ask whoever runs {host} for its new key; never remove that line to get in")
    if known.find(blob) is not None:
        return True
    if not known:
        return False
    was = ", ".join(f"{describe(k.key_type, k.blob)} ({k.where})" for k in known.keys)
    raise HostError(
        f"the host key of {where} has CHANGED: known_hosts has {was}, the host offered "
        f"{describe(key_type, blob)}; someone may be intercepting the connection, or the host was reinstalled",
        hint=(f"only if you know why it changed: `ssh-keygen -R {shlex.quote(known.name)}`, then "
              f"`macrun hosts trust {host}`"))


def append(path: Path, name: str, key_type: str, key_base64: str) -> None:
    """Append `name key_type key` to `path` (creating its folder 700 and the file 600)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    needs_newline = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(("\n" if needs_newline else "") + f"{name} {key_type} {key_base64}\n")


# ---- reading --------------------------------------------------------------------------------------

def _entries(path: Path) -> Iterable[tuple[str, KnownKey]]:
    """(host patterns, key) for each usable line of `path`; nothing when it is missing or unreadable."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return  # an unreadable file knows no keys; the user then sees "unknown key"
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        entry = _parse(line, path, number)
        if isinstance(entry, str):
            _note(path, number, entry)
        else:
            yield entry


def _parse(line: str, path: Path, number: int) -> tuple[str, KnownKey] | str:
    """The line's (patterns, key), or the reason it is skipped, in words."""
    fields = line.split()
    marker = ""
    if fields[0].startswith("@"):
        marker, fields = fields[0], fields[1:]
        if marker == "@cert-authority":
            return "@cert-authority lines (host certificates) are not supported by macrun; skipped"
        if marker != "@revoked":
            return f"unknown marker {marker!r}; line skipped"
    if len(fields) < 3:
        return "not `host key-type key`; line skipped"
    patterns, key_type, data = fields[:3]
    try:
        blob = base64.b64decode(data, validate=True)
        (size,) = struct.unpack(">I", blob[:4])
        inner_type = blob[4:4 + size].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError, ValueError):
        return "the key is not valid base64 SSH key data; line skipped"
    if inner_type != key_type and not key_type.endswith("-cert-v01@openssh.com"):
        return f"key type {key_type} does not match the key ({inner_type}); line skipped"
    return patterns, KnownKey(key_type, blob, path, number, revoked=marker == "@revoked")


def _matches(patterns: str, name: str) -> bool:
    """OpenSSH's match_hostname: any positive pattern matches and no `!pattern` does (case-insensitive)."""
    name = name.lower()
    if patterns.startswith("|1|"):
        return _hashed_matches(patterns, name)
    found = False
    for pattern in patterns.lower().split(","):
        negated = pattern.startswith("!")
        if _wildcard(pattern[1:] if negated else pattern).fullmatch(name):
            if negated:
                return False
            found = True
    return found


def _hashed_matches(entry: str, name: str) -> bool:
    parts = entry.split("|")  # "", "1", salt, hash
    if len(parts) != 4:
        return False
    try:
        salt, digest = base64.b64decode(parts[2], validate=True), base64.b64decode(parts[3], validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), digest)


def _wildcard(pattern: str) -> re.Pattern[str]:
    # Not fnmatch: `[` is literal in known_hosts (`[host]:port`), only `*` and `?` are wildcards.
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern),
                      re.DOTALL)


def _note(path: Path, number: int, reason: str) -> None:
    """Say once per process why a line is skipped: connections are many, the line is one."""
    with _noted_lock:
        if (str(path), number, reason) in _noted:
            return
        _noted.add((str(path), number, reason))
    log.warning("note: %s line %d: %s", path, number, reason)
