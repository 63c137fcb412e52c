"""Push a job's files to a host's work dir, sending only what changed (SHA-256 of the contents).

One remote command asks the host for the hashes of the files it already has (and creates the
folders); then only missing or changed files go over SFTP, each to a temp name renamed into place, so
a rank never reads half a file. A job folder holds training text and checkpoints: it is private to the
login user (folders 700, files 600, executables 700) whatever the host's umask.
"""

from __future__ import annotations

import hashlib
import json
import stat
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from distributed.errors import HostError
from launcher.transport.shell import shell_path, shell_quote
from launcher.transport.ssh import SSHConnection

HASH_TIMEOUT_S = 120.0  # hashing a few hundred MB of prepared data on a slow disk

# Runs on the host: expand ~, create the folders (700: umask 077), make the job folder and the files
# already there private (an older macrun left them 755/644), report {rel: [sha256, executable]} or null.
_REMOTE_HASHES = """
import hashlib, json, os, sys
os.umask(0o077)
root = os.path.abspath(os.path.expanduser(sys.argv[1]))
os.makedirs(root, exist_ok=True)
os.chmod(root, 0o700)
found = {}
for rel in json.load(sys.stdin):
    path = os.path.join(root, rel)
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        mode = os.stat(path).st_mode
        found[rel] = [digest.hexdigest(), bool(mode & 0o111)]
        if mode & 0o077:
            os.chmod(path, 0o700 if mode & 0o111 else 0o600)
    except OSError:
        found[rel] = None
        os.makedirs(os.path.dirname(path), exist_ok=True)
print(json.dumps({"root": root, "files": found}))
"""
FILE_MODE, EXEC_MODE = 0o600, 0o700  # what a synced file gets on the host


@dataclass(frozen=True, slots=True)
class SyncReport:
    """What one sync did on one host; `remote_dir` is the absolute (expanded) folder."""

    sent: int
    skipped: int
    bytes_sent: int
    seconds: float
    remote_dir: str = ""


def file_digest(path: Path) -> str:
    """SHA-256 of a local file's contents, hex."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_executable(path: Path) -> bool:
    return bool(path.stat().st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH))


def _check_relative(rel: str) -> None:
    parts = PurePosixPath(rel).parts
    if not parts or rel.startswith("/") or ".." in parts:
        raise ValueError(f"sync path {rel!r} must be relative and stay inside the work dir")


def remote_hashes(conn: SSHConnection, rels: Sequence[str], remote_dir: str) -> tuple[str, dict]:
    """Ask the host (one command) for the absolute work dir and {rel: [sha256, exec] | None}."""
    python = conn.host.python
    cmd = f"{shell_path(python)} -c {shell_quote(_REMOTE_HASHES)} {shell_quote(remote_dir)}"
    result = conn.run(cmd, stdin=json.dumps(list(rels)).encode(), timeout=HASH_TIMEOUT_S)
    try:
        answer = json.loads(result.stdout)
        return str(answer["root"]), dict(answer["files"])
    except (ValueError, KeyError, TypeError) as exc:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise HostError(f"cannot prepare {remote_dir} on {conn.host.name} (exit status {result.rc}): {tail}",
                        hint=f"check that \"workdir\" for {conn.host.name} in hosts.json is writable "
                             f"and that {python!r} runs there") from exc


def sync_files(conn: SSHConnection, files: Mapping[str, Path], remote_dir: str) -> SyncReport:
    """Make `remote_dir/rel` equal `files[rel]` for every rel on the host; send only what differs.

    `remote_dir` may start with `~` (expanded on the host). The exec bit travels with each file.
    """
    started = time.perf_counter()
    for rel in files:
        _check_relative(rel)
    local = {rel: (Path(p), file_digest(Path(p)), _is_executable(Path(p))) for rel, p in files.items()}
    root, remote = remote_hashes(conn, list(local), remote_dir)
    sent = bytes_sent = 0
    for rel, (path, digest, executable) in local.items():
        if remote.get(rel) == [digest, executable]:
            continue
        conn.put_file(path, f"{root}/{rel}", mode=EXEC_MODE if executable else FILE_MODE)
        sent += 1
        bytes_sent += path.stat().st_size
    return SyncReport(sent=sent, skipped=len(local) - sent, bytes_sent=bytes_sent,
                      seconds=time.perf_counter() - started, remote_dir=root)


def sync_all(conns: Sequence[SSHConnection], files: Mapping[str, Path],
             remote_dir: str | Mapping[str, str]) -> dict[str, SyncReport]:
    """`sync_files` on every host in parallel (remote_dir: one for all, or by host name)."""
    if not conns:
        return {}

    def dir_for(conn: SSHConnection) -> str:
        return remote_dir if isinstance(remote_dir, str) else remote_dir[conn.host.name]

    with ThreadPoolExecutor(max_workers=min(16, len(conns))) as pool:
        futures = {c.host.name: pool.submit(sync_files, c, files, dir_for(c)) for c in conns}
    reports: dict[str, SyncReport] = {}
    failures: list[HostError] = []
    for name, fut in futures.items():
        try:
            reports[name] = fut.result()
        except HostError as exc:
            failures.append(exc)
    if failures:
        text = str(failures[0]) if len(failures) == 1 else (
            f"sync failed on {len(failures)} hosts:\n  " + "\n  ".join(str(e) for e in failures))
        raise HostError(text, hint=failures[0].hint) from failures[0]
    return reports


def package_files(package_dir: Path, prefix: str) -> dict[str, Path]:
    """A Python package's .py files keyed `prefix/relative/path.py` (no __pycache__), sorted."""
    prefix = prefix.strip("/")
    found: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir)
        if "__pycache__" in rel.parts or not path.is_file():
            continue
        found[f"{prefix}/{rel.as_posix()}" if prefix else rel.as_posix()] = path
    return found
