"""The model on every host before launch: use the copy each host has, or (`--push-model`) copy it there.

A host's copy goes to `<workdir>/models/<manifest digest>/`: content-addressed, so another model or version
gets another folder and a complete folder never changes. Only files the folder lacks or holds with other
contents are sent. Each is written to `<name>.part` and renamed when whole; a copy cut off (Ctrl-C, a
dropped link) leaves its `.part`, and the next push appends from its size instead of starting over. The
store is checked on the host afterwards (sizes and SHA-256, as before), so a resumed file that does not
match is sent again, whole.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from distributed.errors import HostError
from launcher.models.modelfiles import HostModel, ModelSpec, check_model, missing_model_error
from launcher.transport.ssh import TRANSFER_ERRORS, SSHConnection
from launcher.transport.sync import FILE_MODE
from launcher.views.display import LineProgress, TransferProgress

CHUNK = 1 << 20  # read from disk per write; paramiko splits it into SFTP requests and pipelines them
Emit = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class PushReport:
    """What one host received: `dir` holds the model now."""

    host: str
    dir: str
    files: int
    bytes_sent: int
    resumed_bytes: int  # bytes already there in .part files, not sent again
    seconds: float


def upload_resumable(conn: SSHConnection, local: Path, remote: str, on_bytes: Callable[[int], None]) -> tuple[int, int]:
    """Copy `local` to the absolute path `remote` via `remote.part`, continuing a .part already there.

    Returns (bytes sent, bytes that were already in the .part). A failure leaves the .part for the next try.
    """
    sftp, part, size = conn.sftp(), f"{remote}.part", local.stat().st_size
    have = sent = 0
    try:
        try:
            have = sftp.stat(part).st_size or 0
        except OSError:  # no .part: a fresh copy
            have = 0
        if have > size:  # not a prefix of this file: start over
            sftp.remove(part)
            have = 0
        with sftp.open(part, "ab" if have else "wb") as f, local.open("rb") as src:
            if not have:
                f.chmod(FILE_MODE)
            f.set_pipelined(True)
            src.seek(have)
            for chunk in iter(lambda: src.read(CHUNK), b""):
                f.write(chunk)
                sent += len(chunk)
                on_bytes(len(chunk))
        sftp.posix_rename(part, remote)
    except TRANSFER_ERRORS as exc:
        raise HostError(f"copying {local.name} to {conn.host.name} stopped after {(have + sent) / 1e6:,.1f} of "
                        f"{size / 1e6:,.1f} MB: {exc}",
                        hint="run the same command again: the copy continues where it stopped") from exc
    return sent, have


def _remove_quietly(conn: SSHConnection, path: str) -> None:
    try:
        conn.sftp().remove(path)
    except TRANSFER_ERRORS:
        pass


def push_model(conn: SSHConnection, spec: ModelSpec, progress: TransferProgress) -> PushReport:
    """Make the host's store folder for `spec` complete, sending only what it lacks; checked afterwards."""
    started = time.perf_counter()
    host, local = conn.host.name, {f.rel: f for f in spec.manifest.files}
    state = check_model(conn, spec, store_only=True, make_store=True)  # creates the folder, reports .part sizes
    store = state.store
    todo = list(state.store_state.missing + state.store_state.different)
    parts = dict(state.store_state.parts)
    files = sent_total = resumed_total = 0
    for attempt in (1, 2):
        progress.add(host, sum(local[r].size - (parts.get(r, 0) if parts.get(r, 0) <= local[r].size else 0)
                               for r in todo))
        for rel in todo:
            sent, had = upload_resumable(conn, spec.local_dir / rel, posixpath.join(store, rel),
                                         lambda n: progress.advance(host, n))
            files, sent_total, resumed_total = files + 1, sent_total + sent, resumed_total + had
        if not todo and state.found:
            break
        state = check_model(conn, spec, store_only=True)
        if state.found:
            break
        todo = list(state.store_state.missing + state.store_state.different)
        if attempt == 2:
            raise HostError(f"the model copied to {host} does not match this machine's ({', '.join(todo)} "
                            f"differ in {store})", hint=f"check the disk on {host}, then run the command again")
        for rel in todo:  # a .part that was not this file's beginning: send it again, whole
            _remove_quietly(conn, posixpath.join(store, rel) + ".part")
            _remove_quietly(conn, posixpath.join(store, rel))
        parts = {}
    return PushReport(host, store, files, sent_total, resumed_total, time.perf_counter() - started)


def push_models(conns: Sequence[SSHConnection], spec: ModelSpec, progress: TransferProgress) -> list[PushReport]:
    """`push_model` to every host at once; the first failure is raised once the others stopped or finished."""
    if len(conns) == 1:
        with progress:
            return [push_model(conns[0], spec, progress)]
    pool = ThreadPoolExecutor(max_workers=min(8, len(conns)))
    try:
        with progress:
            futures = [pool.submit(push_model, c, spec, progress) for c in conns]
            return [f.result() for f in futures]
    finally:  # on Ctrl-C, do not wait for every copy: closing the connections ends them, .part files stay
        pool.shutdown(wait=False, cancel_futures=True)


def place_models(conns: Sequence[SSHConnection], spec: ModelSpec, found: Mapping[str, HostModel], *, emit: Emit,
                 progress: TransferProgress | None = None) -> dict[str, str]:
    """{host: the folder its ranks load the model from}: where each host has it, or where it was pushed.

    Without `spec.push`, hosts that lack the model or hold another version are one HostError naming them all.
    """
    misses = [m for m in found.values() if m.found is None]
    if misses and not spec.push:
        raise missing_model_error(spec, misses)
    dirs = {name: m.found for name, m in found.items() if m.found is not None}
    if not misses:
        emit(f"model on {', '.join(found)}: already there" + (" (0 bytes sent)" if spec.push else ""))
        return dirs
    by_name = {c.host.name: c for c in conns}
    reports = push_models([by_name[m.host] for m in misses], spec, progress or LineProgress(emit))
    for r in reports:
        dirs[r.host] = r.dir
    sent = sum(r.bytes_sent for r in reports)
    resumed = sum(r.resumed_bytes for r in reports)
    line = (f"model pushed to {', '.join(r.host for r in reports)}: {sum(r.files for r in reports)} file(s), "
            f"{sent / 1e6:,.1f} MB sent in {max(r.seconds for r in reports):.1f} s")
    if resumed:
        line += f", continuing {resumed / 1e6:,.1f} MB copied before"
    already = [name for name in found if name not in {r.host for r in reports}]
    emit(line + (f"; already on {', '.join(already)}" if already else ""))
    return dirs
