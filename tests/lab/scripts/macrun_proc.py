"""Drive the real `macrun` command as a user would: a subprocess with its own HOME, output read live.

    proc = MacrunProcess(["run", "--hosts", str(hosts), "--", "python", str(SCRIPTS / "allsum.py")],
                         home=lab.ssh_home, cwd=tmp_path)
    proc.wait_for(r"\\[rank 2 h2\\] world=3", timeout=30)
    assert proc.finish(timeout=30) == 0
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

SCRIPTS = Path(__file__).resolve().parent
MACRUN = str(Path(sys.executable).with_name("macrun"))  # the console script of this very environment


def cli_env(home: Path | None = None) -> dict[str, str]:
    """This environment minus the ssh agent and macrun's debug switch; HOME replaced when given."""
    env = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "MACRUN_DEBUG")}
    if home is not None:
        env["HOME"] = str(home)
    env["COLUMNS"] = "200"  # the failure table's reason column stays on one line per rank
    return env


def run_macrun(args: Sequence[str], *, home: Path | None, cwd: Path,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `macrun ARGS` to its end and return what it printed."""
    return subprocess.run([MACRUN, *args], cwd=cwd, env=cli_env(home), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def error_block(stderr: str) -> tuple[list[str], list[str]]:
    """The `error:` lines and the `hint:` lines of macrun's stderr."""
    lines = stderr.splitlines()
    return ([line for line in lines if line.startswith("error:")],
            [line for line in lines if line.startswith("hint:")])


def assert_one_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """Exit `code`, exactly one `error:` line and one `hint:` line, no traceback; return the error text.

    Every `needle` must appear in the error (its line plus any indented detail lines under it).
    """
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode}, wanted {code}\n{out}"
    assert "Traceback" not in out, out
    errors, hints = error_block(proc.stderr)
    assert len(errors) == 1 and len(hints) == 1, proc.stderr
    lines = proc.stderr.splitlines()
    # Nothing else on stderr: the error, its own indented detail lines (one per host), the hint.
    detail = lines[:lines.index(hints[0])]
    assert detail[0] == errors[0] and lines[len(detail):] == hints, proc.stderr
    assert all(line.startswith("  ") for line in detail[1:]), proc.stderr
    text = "\n".join(detail)
    for needle in needles:
        assert needle in text, f"{needle!r} not in the error:\n{proc.stderr}"
    return text


class MacrunProcess:
    """A `macrun` subprocess whose stdout and stderr are collected line by line as they come."""

    def __init__(self, args: Sequence[str], *, home: Path | None, cwd: Path) -> None:
        self.proc = subprocess.Popen([MACRUN, *args], cwd=cwd, env=cli_env(home), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self._out: list[str] = []
        self._err: list[str] = []
        self._changed = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(stream, sink), daemon=True)
                         for stream, sink in ((self.proc.stdout, self._out), (self.proc.stderr, self._err))]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: IO[str] | None, sink: list[str]) -> None:
        assert stream is not None
        for line in stream:
            with self._changed:
                sink.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def stdout(self) -> str:
        with self._changed:
            return "\n".join(self._out)

    @property
    def stderr(self) -> str:
        with self._changed:
            return "\n".join(self._err)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first stdout line matching `pattern`, waiting up to `timeout` s for it to be printed."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self._out[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self._out)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not any(r.is_alive() for r in self._readers)):
                    raise AssertionError(f"macrun never printed /{pattern}/ (exit {self.proc.poll()}):\n"
                                         f"{chr(10).join(self._out)}\n{chr(10).join(self._err)}")
                self._changed.wait(min(left, 0.5))

    def interrupt(self) -> None:
        """Ctrl-C, as a terminal would deliver it to the macrun process."""
        self.proc.send_signal(signal.SIGINT)

    def finish(self, timeout: float) -> int:
        """Wait for macrun to exit (and its output to be read); its exit code."""
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return code

    def kill(self) -> None:
        """Make sure it is gone (test clean-up)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for reader in self._readers:
            reader.join(5)

    def __enter__(self) -> MacrunProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
