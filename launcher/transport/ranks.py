"""Starting one rank: what a rank is (RankSpec) and the launchers that start its shim locally or over SSH.

Every rank runs under `python -u -m distributed.rankshim` on its own host (see that module): the shim
gets the rank's argv, env and cwd as one JSON line on stdin, so secrets never appear on a command
line, and it stops the rank's whole process group when told to or when its stdin closes. Local and
remote ranks therefore share one code path; the launchers here only differ in how they start the
shim and how they reach it afterwards, behind the small `RankHandle` interface that launcher/jobs/job.py
drives.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

from distributed.errors import HostError
from launcher.transport.shell import check_env_names, shell_path

if TYPE_CHECKING:  # launcher/transport/ssh.py imports paramiko; only its types are needed here
    from launcher.transport.ssh import RemoteProcess, SSHConnection

SHIM_MODULE = "distributed.rankshim"
HOST_KILL_TIMEOUT_S = 5.0  # a `kill` over a fresh SSH exec answers in milliseconds; a dead host never does


@dataclass(frozen=True)
class RankSpec:
    """One rank, resolved: what to run, where, and with which environment."""

    rank: int
    host_name: str  # label used in logs ("[rank 2 studio]") and to pick the host's launcher
    local_rank: int
    argv: list[str]  # the rank's program, e.g. [python, "-m", "distributed.worker", "config.yaml"]
    env: dict[str, str]  # added to the host's environment; may hold MACRUN_SECRET (sent over stdin only)
    cwd: str  # the program's working directory on its host: absolute, or relative to the shim's folder
    python: str  # the interpreter that runs the shim on that host


def shim_request(spec: RankSpec, *, grace: float, report: str | None = None) -> bytes:
    """The one JSON line the shim reads on stdin (see distributed/rankshim.py for its fields).

    ConfigError if an environment variable's name is not a valid one (the shim could not set it).
    """
    check_env_names(spec.env)
    request: dict[str, object] = {"argv": list(spec.argv), "env": dict(spec.env), "cwd": spec.cwd,
                                  "grace": grace}
    if report:
        request["report"] = report
    return (json.dumps(request) + "\n").encode("utf-8")


def shim_exit_code(returncode: int) -> int:
    """A shell-style exit code: a process ended by signal N (Popen's -N) becomes 128+N, like the shim."""
    return 128 - returncode if returncode < 0 else returncode


class RankHandle(Protocol):
    """A started shim, as job control sees it. Readers run in threads; the rest is called by the monitor."""

    stdout: IO[bytes]
    stderr: IO[bytes]
    may_be_lost: bool  # False: `wait(None)` is enough to learn the end; True: poll `is_lost()` as well

    def wait(self, timeout: float | None) -> int | None:
        """The shim's exit code (128+N for signal N), or None if it is still running after `timeout`."""
        ...

    def is_lost(self) -> bool:
        """True when the way to the shim is gone (SSH channel or connection dropped) without an exit."""
        ...

    def request_stop(self) -> None:
        """Ask the shim to SIGTERM the rank's group (it SIGKILLs it itself after the grace period)."""
        ...

    def hard_stop(self, pgid: int | None, shim_pid: int | None) -> None:
        """Stop now: SIGKILL the rank's group and the shim (their ids as the shim reported them)."""
        ...

    def close(self) -> None:
        """Release pipes or the channel. Called once the rank is over."""
        ...


class RankLauncher(Protocol):
    """Starts the shim for one rank on one host and writes `request` to its stdin."""

    def start(self, spec: RankSpec, request: bytes) -> RankHandle:
        """Start the shim; raise (OSError, MacrunError) when it cannot be started at all."""
        ...


def _default_pythonpath() -> Path:
    import distributed  # the folder that holds our own `distributed` package, wherever it is installed

    return Path(distributed.__file__).resolve().parent.parent


class LocalRankHandle:
    """A shim running as a subprocess of this launcher."""

    may_be_lost = False

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdin and process.stdout and process.stderr
        self.process = process
        self.stdout: IO[bytes] = process.stdout
        self.stderr: IO[bytes] = process.stderr
        self._stdin_lock = threading.Lock()

    def send(self, data: bytes) -> None:
        """Write to the shim's stdin; a shim that already exited is not an error."""
        with self._stdin_lock:
            stdin = self.process.stdin
            if stdin is None or stdin.closed:
                return
            try:
                stdin.write(data)
                stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                pass

    def wait(self, timeout: float | None) -> int | None:
        try:
            return shim_exit_code(self.process.wait(timeout))
        except subprocess.TimeoutExpired:
            return None

    def is_lost(self) -> bool:
        return False

    def request_stop(self) -> None:
        self.send(b"TERM\n")

    def hard_stop(self, pgid: int | None, shim_pid: int | None) -> None:
        self.send(b"KILL\n")
        self._close_stdin()
        if pgid is not None and pgid > 1:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.process.poll() is None:
            self.process.kill()  # the shim leads its own session: this reaches the shim only

    def close(self) -> None:
        self._close_stdin()

    def _close_stdin(self) -> None:
        with self._stdin_lock:
            if self.process.stdin is not None and not self.process.stdin.closed:
                try:
                    self.process.stdin.close()
                except (BrokenPipeError, OSError):
                    pass


class LocalLauncher:
    """Start shims as local subprocesses.

    `pythonpath` is the folder holding the `distributed` package the shim is imported from (default:
    this installation's); the shim runs there, while the rank itself runs in `spec.cwd`. Each shim gets
    its own session, so a terminal's Ctrl-C reaches the launcher only, which then stops every rank the
    same way, local or remote.
    """

    def __init__(self, pythonpath: str | os.PathLike[str] | None = None) -> None:
        self.pythonpath = Path(pythonpath) if pythonpath is not None else _default_pythonpath()

    def start(self, spec: RankSpec, request: bytes) -> RankHandle:
        process = subprocess.Popen(
            [spec.python, "-u", "-m", SHIM_MODULE], cwd=self.pythonpath,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, close_fds=True,
        )
        handle = LocalRankHandle(process)
        handle.send(request)
        return handle


class SSHRankHandle:
    """A shim running on another host, reached through one exec channel of an SSH connection."""

    may_be_lost = True

    def __init__(self, conn: SSHConnection, process: RemoteProcess) -> None:
        self.conn = conn
        self.process = process
        self.stdout: IO[bytes] = process.stdout
        self.stderr: IO[bytes] = process.stderr

    def send(self, data: bytes) -> None:
        try:
            self.process.write_stdin(data)
        except Exception:  # a closed or dead channel: the monitor learns that from is_lost
            pass

    def wait(self, timeout: float | None) -> int | None:
        return self.process.wait(timeout)

    def is_lost(self) -> bool:
        return self.process.is_lost()

    def request_stop(self) -> None:
        self.send(b"TERM\n")

    def hard_stop(self, pgid: int | None, shim_pid: int | None) -> None:
        # KILL then EOF: the shim SIGKILLs the group. In case the shim itself is stuck, also kill the
        # group and the shim over a separate exec; that can hang on a dead host, so it runs in a thread.
        self.send(b"KILL\n")
        try:
            self.process.close_stdin()
        except Exception:  # same as send()
            pass
        targets = ([f"-{pgid}"] if pgid is not None and pgid > 1 else []) + (
            [str(shim_pid)] if shim_pid is not None and shim_pid > 1 else [])
        if targets:
            threading.Thread(target=self._kill, args=(targets,), name="rank-hard-stop", daemon=True).start()

    def _kill(self, targets: list[str]) -> None:
        try:
            self.conn.run(f"kill -9 -- {' '.join(targets)} 2>/dev/null; true", timeout=HOST_KILL_TIMEOUT_S)
        except Exception:  # best effort: the host may be unreachable, which is why we are here
            pass

    def close(self) -> None:
        try:
            self.process.close()
        except Exception:  # closing a dead channel
            pass


class SSHLauncher:
    """Start shims on one remote host over an open SSH connection.

    `workdir` is the folder on that host that holds the synced `distributed` package (the run's work
    dir); `~/` at its start is expanded by the remote shell.

    `prestart` starts shims before their ranks are planned: each waits for its request on stdin, so a
    rank's start is then one write instead of a channel open, an exec, an interpreter start and the
    shim's imports (measured in benchmarks/launch.py). A shim that never gets a request ends at EOF, when
    `discard` (or closing the connection) closes its channel: nothing ever runs in it.
    """

    def __init__(self, conn: SSHConnection, workdir: str) -> None:
        self.conn = conn
        self.workdir = workdir
        self._warm: list[tuple[str, RemoteProcess]] = []  # (command, a shim waiting for its request)
        self._lock = threading.Lock()

    def command(self, spec: RankSpec) -> str:
        """The remote command line: no secrets on it, those travel in the request on stdin."""
        return self._command(spec.python)

    def _command(self, python: str) -> str:
        return f"cd {shell_path(self.workdir)} && exec {shell_path(python)} -u -m {SHIM_MODULE}"

    def prestart(self, python: str, count: int) -> None:
        """Start `count` shims with `python` now, for ranks whose requests come later (see the class).

        Best effort: where one cannot start, its rank starts the ordinary way and reports any error then.
        """
        command = self._command(python)
        for _ in range(count):
            try:
                process = self.conn.start(command)
            except Exception:  # a HostError (connection lost): start() says so, for the rank it concerns
                return
            with self._lock:
                self._warm.append((command, process))

    def _take_warm(self, command: str) -> RemoteProcess | None:
        """A pre-started shim for `command` that still waits, if any (one that already ended is dropped)."""
        while True:
            with self._lock:
                if not self._warm:
                    return None
                warm_command, process = self._warm.pop(0)
            if warm_command == command and process.poll() is None and not process.is_lost():
                return process
            process.close()

    def discard(self) -> None:
        """Close the pre-started shims nobody took: each ends at EOF without running anything."""
        with self._lock:
            warm, self._warm = self._warm, []
        for _, process in warm:
            try:
                process.close()
            except Exception:  # closing a dead channel
                pass

    def start(self, spec: RankSpec, request: bytes) -> RankHandle:
        # Not `start(stdin=request)`: that sends EOF after the bytes, and EOF tells the shim to stop.
        command = self.command(spec)
        warm = self._take_warm(command)
        if warm is not None:
            try:
                warm.write_stdin(request)
                return SSHRankHandle(self.conn, warm)
            except Exception:  # it ended since: start a fresh one, which reports what is wrong
                warm.close()
        process = self.conn.start(command)
        try:
            process.write_stdin(request)
        except BaseException:
            process.close()
            raise
        return SSHRankHandle(self.conn, process)


def launchers_for(
    specs: list[RankSpec], launchers: Mapping[str, RankLauncher] | None,
) -> dict[int, RankLauncher]:
    """Pick each rank's launcher by host name: all local when `launchers` is None."""
    if launchers is None:
        local = LocalLauncher()
        return {spec.rank: local for spec in specs}
    chosen: dict[int, RankLauncher] = {}
    for spec in specs:
        launcher = launchers.get(spec.host_name)
        if launcher is None:
            raise HostError(f"rank {spec.rank} is placed on host {spec.host_name!r}, which has no launcher",
                            hint="pass a launcher (an SSH connection) for every host in the hosts file")
        chosen[spec.rank] = launcher
    return chosen
