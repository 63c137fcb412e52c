"""Copying results back from a host: confined to the run folder, never through links, checkpoints as they land.

A run's checkpoints are written on rank 0's host. Copied back only at the end, a host that dies takes
every checkpoint since the start with it; so while a training run goes, each checkpoint that rank 0
announces ("checkpoint checkpoints/step_N") is copied to the master at once, in the background, and a
restart on the hosts that remain resumes from it.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import stat
import threading
from collections.abc import Callable
from pathlib import Path

from launcher.transport.ssh import SSHConnection

_ANNOUNCED = re.compile(r"^\[rank 0 [^\]]*\] checkpoint (?:.*/)?(step_\d{8,})$")
_SAFE_NAME = re.compile(r"[^/\x00]+")


def fetch_tree(conn: SSHConnection, remote: str, local: Path, *, lock: threading.Lock | None = None) -> int:
    """Copy a remote file or folder to `local` over SFTP; returns the number of files copied.

    Only plain files and folders are followed (a remote symlink is skipped, so a compromised host cannot
    make us read or write elsewhere), names must be plain (no '/', '.' or '..'), and a file already here
    with the same size and modification time is not copied again (each copy takes the remote file's mtime),
    so a file rewritten in place on the host (a fine-tune's adapters) is fetched afresh.
    """
    from distributed.checkpoint import TMP_PREFIX  # imports MLX: not on `macrun run`'s path to its ranks

    guard = lock or threading.Lock()
    sftp = conn.sftp()
    with guard:
        try:
            attrs = sftp.lstat(remote)
        except OSError:
            return 0
    mode = attrs.st_mode or 0
    if stat.S_ISREG(mode):
        here = local.stat() if local.is_file() else None
        if here is not None and (here.st_size, int(here.st_mtime)) == (attrs.st_size, attrs.st_mtime):
            return 0
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".{local.name}.part")
        with guard:
            sftp.get(remote, str(partial))
        if attrs.st_mtime is not None:
            os.utime(partial, (attrs.st_mtime, attrs.st_mtime))
        partial.replace(local)
        return 1
    if not stat.S_ISDIR(mode):
        return 0  # a link, a socket, a device: never followed
    with guard:
        entries = sftp.listdir_attr(remote)
    copied = 0
    for entry in entries:
        name = entry.filename
        if name.startswith(TMP_PREFIX) or name in (".", "..") or not _SAFE_NAME.fullmatch(name):
            continue  # a checkpoint still being written, or a name that could leave the folder
        copied += fetch_tree(conn, posixpath.join(remote, name), local / name, lock=guard)
    return copied


class CheckpointFetcher:
    """Copies each checkpoint rank 0 announces from its host into `run_dir/checkpoints`, one at a time."""

    def __init__(self, conn: SSHConnection, job_dir: str, run_dir: Path, keep: int,
                 emit: Callable[[str], None]) -> None:
        self.conn, self.job_dir, self.root, self.keep, self.emit = conn, job_dir, run_dir / "checkpoints", keep, emit
        self.lock = threading.Lock()  # one SFTP request at a time on the connection's session
        self._pending: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self.fetched: list[str] = []
        self._thread = threading.Thread(target=self._run, name="checkpoint-fetch", daemon=True)
        self._thread.start()

    def saw(self, line: str) -> None:
        """Look at one output line; a checkpoint announcement of rank 0 queues its folder."""
        match = _ANNOUNCED.match(line)
        if match:
            with self._cond:
                self._pending.append(match.group(1))
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                name = self._pending.pop(0)
            self._fetch(name)

    def _fetch(self, name: str) -> None:
        from distributed.checkpoint import TMP_PREFIX, prune_checkpoints

        final = self.root / name
        if final.is_dir():
            return
        partial = self.root / f"{TMP_PREFIX}fetch-{name}"
        try:
            shutil.rmtree(partial, ignore_errors=True)
            if fetch_tree(self.conn, posixpath.join(self.job_dir, "checkpoints", name), partial, lock=self.lock):
                partial.replace(final)
                self.fetched.append(name)
                prune_checkpoints(self.root, self.keep)
        except Exception as exc:  # noqa: BLE001 - the host may be going away (paramiko, socket or our errors);
            # the end-of-run fetch tries again
            self.emit(f"[macrun] could not copy {name} from its host yet: {exc}")
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def close(self, timeout: float = 30.0) -> None:
        """Finish the checkpoints queued so far (bounded by `timeout`), then stop."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
