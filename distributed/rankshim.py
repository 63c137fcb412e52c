"""The rank shim: start one rank's program in its own process group and make sure it never outlives us.

    python -u -m distributed.rankshim   # then one JSON line on stdin

The launcher starts this shim once per rank, on the rank's host (over SSH, or as a local subprocess:
one code path), and writes one JSON line to its stdin:

    {"argv": [...], "env": {...}, "cwd": "...", "grace": 5.0, "report": "<token>"}

`env` travels over stdin, never on a command line, so secrets do not show up in `ps`. The program
inherits the shim's stdout and stderr; its stdin is /dev/null because the shim's own stdin is the
control channel. Stop requests arrive on it as lines: "TERM" (SIGTERM to the program's whole process
group, SIGKILL after `grace` seconds) and "KILL" (SIGKILL now). EOF on stdin means the launcher or
the SSH channel died: the shim stops the program as for "TERM" (or as for "KILL" when a "TERM" came
first, which is how the launcher escalates). SIGTERM, SIGINT and SIGHUP sent to the shim itself are
forwarded to the group, with the same SIGKILL after `grace`. When the program exits, whatever it left
behind in its group is stopped too. So no process survives on any host, even when macrun is killed -9.

The shim exits with the program's exit code (128+N when signal N ended it), and prints nothing of its
own, except one error line when the program cannot be started (exit 127) and, when `report` is set,
one line `<token> pgid=<program's group> shim=<own pid>` on stderr that the launcher strips from the
rank's output: with it the launcher can kill the group and the shim should the shim ever hang.

On macOS the program runs under `caffeinate -i -s -w <program's pid>`: a Mac that idles into sleep
mid-run drops off the network and its peers time out. caffeinate ends with the program (-w) and is
stopped by the shim too; when it is missing or fails, the rank runs anyway. MACRUN_CAFFEINATE=1 (in the
shim's environment or the request's `env`) forces it on, as tests do with a fake caffeinate on PATH;
=0 turns it off; unset, it is on for macOS only.

Standard library only, Python 3.9+: it runs on every host, whatever Python that host has.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

EXIT_CANNOT_START = 127
EXIT_BAD_REQUEST = 2
KEEP_AWAKE_ENV = "MACRUN_CAFFEINATE"  # "1": always, "0": never, unset: on macOS only


class _Stopper:
    """Stops the program's process group once: a signal now, SIGKILL after the grace period."""

    def __init__(self, grace: float, exited: threading.Event) -> None:
        self._pgid: int | None = None
        self._pending: int | None = None  # a stop asked for before the program started
        self._grace = grace
        self._exited = exited
        # Re-entrant: the signal handlers run on the main thread, possibly inside attach().
        self._lock = threading.RLock()
        self._started = False

    def attach(self, pgid: int) -> None:
        """The program is running as group `pgid`; carry out a stop that came before it did."""
        with self._lock:
            self._pgid = pgid
            pending, self._pending = self._pending, None
        if pending == signal.SIGKILL:
            self.kill()
        elif pending is not None:
            self._started = False
            self.stop(pending)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to the group; the first call also arms the SIGKILL after the grace period."""
        with self._lock:
            first = not self._started
            self._started = True
            pgid = self._pgid
            if pgid is None:
                self._pending = self._pending or sig
                return
        _killpg(pgid, sig)
        if first:
            threading.Thread(target=self._escalate, args=(pgid,), name="rankshim-grace", daemon=True).start()

    def kill(self) -> None:
        """SIGKILL the group now."""
        with self._lock:
            self._started = True
            pgid = self._pgid
            if pgid is None:
                self._pending = signal.SIGKILL
                return
        _killpg(pgid, signal.SIGKILL)

    @property
    def started(self) -> bool:
        return self._started

    def _escalate(self, pgid: int) -> None:
        if not self._exited.wait(self._grace):
            _killpg(pgid, signal.SIGKILL)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def _group_alive(pgid: int) -> bool:
    """True while a live process is in group `pgid`. Zombies do not count: an init that is slow to
    reap them (some containers' PID 1 never does) must not hold us up."""
    if sys.platform.startswith("linux") and os.path.isdir("/proc/self"):
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue  # it ended while we looked
            if len(fields) > 2 and fields[2] == str(pgid).encode() and fields[0] not in (b"Z", b"X"):
                return True
        return False
    try:
        os.killpg(pgid, 0)  # elsewhere (macOS) launchd reaps orphans at once
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _LineReader:
    """Lines from a file descriptor with plain os.read: no buffered-reader lock for a daemon thread to
    hold at interpreter shutdown, and nothing read ahead and lost between the request and the watcher."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pending = b""

    def readline(self) -> bytes:
        """One line including its newline; a last line without one; b"" at EOF."""
        while b"\n" not in self._pending:
            try:
                chunk = os.read(self._fd, 4096)
            except InterruptedError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                line, self._pending = self._pending, b""
                return line
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line + b"\n"


def _watch_stdin(reader: _LineReader, stopper: _Stopper) -> None:
    """Turn control lines and EOF on our stdin into stop requests."""
    while True:
        line = reader.readline()
        command = line.strip()
        if not line:
            # The launcher (or the SSH channel) is gone. After a TERM, EOF is its hard stop.
            if stopper.started:
                stopper.kill()
            else:
                stopper.stop(signal.SIGTERM)
            return
        if command == b"TERM":
            stopper.stop(signal.SIGTERM)
        elif command == b"KILL":
            stopper.kill()


def _read_request(reader: _LineReader) -> dict[str, Any]:
    line = reader.readline()
    request = json.loads(line.decode("utf-8"))
    if not isinstance(request, dict):
        raise ValueError("the request is not a JSON object")
    argv = request.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError("argv must be a non-empty list of strings")
    env = request.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise ValueError("env must map strings to strings")
    return request


def _keep_awake_argv(platform: str, pid: int, setting: str | None = None) -> list[str] | None:
    """The `caffeinate` command that keeps this machine awake while `pid` lives, or None where not wanted.

    -i prevents idle sleep, -s system sleep (macOS honours it on AC power only), -w ends it with `pid`.
    `setting` is MACRUN_CAFFEINATE's value: "1" forces it, "0" turns it off, anything else: macOS only.
    """
    wanted = {"1": True, "0": False}.get((setting or "").strip(), platform == "darwin")
    return ["caffeinate", "-i", "-s", "-w", str(pid)] if wanted else None


def _start_keep_awake(argv: list[str] | None) -> subprocess.Popen | None:
    """Start caffeinate, silently: a Mac without it (or a failed start) must not fail the rank."""
    if argv is None:
        return None
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, close_fds=True)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def _stop_keep_awake(proc: subprocess.Popen | None) -> None:
    """Stop caffeinate if -w has not already ended it, and reap it: it must not outlive the rank."""
    if proc is None:
        return
    try:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except OSError:
        pass


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def main() -> int:
    """Run the request read from stdin; return the exit code the shim should exit with."""
    reader = _LineReader(sys.stdin.fileno())
    try:
        request = _read_request(reader)
    except (ValueError, UnicodeDecodeError) as exc:
        sys.stderr.write(f"macrun: rank shim got a bad request on stdin: {exc}\n")
        return EXIT_BAD_REQUEST
    argv: list[str] = request["argv"]
    env = dict(os.environ)
    env.update(request.get("env", {}))
    cwd = request.get("cwd") or None
    grace = float(request.get("grace", 5.0))
    report = request.get("report")

    # Handlers before the program starts, so a stop that arrives meanwhile is kept (stopper.attach
    # carries it out). Caught signals are reset to their defaults in the program by exec.
    exited = threading.Event()
    stopper = _Stopper(grace, exited)

    def forward(signum: int, _frame: object) -> None:
        stopper.stop(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        child = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True,
        )
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if cwd and not os.path.isdir(cwd):
            reason = f"working directory {cwd!r} does not exist"
        sys.stderr.write(f"macrun: cannot start {argv[0]!r}: {reason}\n")
        sys.stderr.flush()
        return EXIT_CANNOT_START
    stopper.attach(child.pid)  # start_new_session: the program leads its own group

    if isinstance(report, str) and report:
        sys.stderr.write(f"{report} pgid={child.pid} shim={os.getpid()}\n")
        sys.stderr.flush()
    keep_awake = _start_keep_awake(_keep_awake_argv(sys.platform, child.pid, env.get(KEEP_AWAKE_ENV)))
    threading.Thread(target=_watch_stdin, args=(reader, stopper), name="rankshim-stdin", daemon=True).start()

    returncode = child.wait()
    exited.set()
    _stop_keep_awake(keep_awake)
    # The program is gone; anything it left in its group (background helpers, data loaders) goes too.
    # POSIX keeps a process group id from being reused while the group has members, so this is safe.
    if _group_alive(child.pid):
        _killpg(child.pid, signal.SIGTERM)
        # They are not our children, so there is nothing to wait on: poll until the group is empty.
        deadline = time.monotonic() + grace
        while _group_alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        _killpg(child.pid, signal.SIGKILL)
    return _exit_code(returncode)


if __name__ == "__main__":
    sys.exit(main())
