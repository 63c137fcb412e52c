"""Job control with real processes: every rank is a tiny `python -c` script run through the rank shim."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from rich.console import Console

from launcher.jobs.job import (
    HARD_STOP_MARGIN_S,
    RankSpec,
    RankState,
    RunResult,
    local_rank_specs,
    render_failure_table,
    run_ranks,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable

# A rank that reports its pid, its shim's pid (its parent) and a grandchild's pid, then blocks forever.
BLOCK = """
import os, subprocess, threading
g = subprocess.Popen(["sleep", "600"])
print(f"pids {os.getpid()} {os.getppid()} {g.pid}", flush=True)
threading.Event().wait()
"""
# The same, but its grandchild is a sibling left behind; it waits for the gate FIFO, then fails.
FAIL_AFTER_GATE = """
import os, subprocess, sys
g = subprocess.Popen(["sleep", "600"])
print(f"pids {os.getpid()} {os.getppid()} {g.pid}", flush=True)
open(sys.argv[1]).read()
print("loading shard 7", flush=True)
print("ValueError: shard 7 is truncated", file=sys.stderr, flush=True)
sys.exit(3)
"""
# Shows (a digest of) the secret it got, then waits for its gate FIFO and exits 0.
SECRET_RANK = """
import hashlib, os, subprocess, sys
g = subprocess.Popen(["sleep", "600"])
print("sha", hashlib.sha256(os.environ["MACRUN_SECRET"].encode()).hexdigest(), flush=True)
print(f"pids {os.getpid()} {os.getppid()} {g.pid}", flush=True)
open(sys.argv[1]).read()
"""
PIDS = re.compile(r"^\[rank (\d+) (\S+)\] pids (\d+) (\d+) (\d+)$")


class Collector:
    """An `emit` that records lines and remembers every rank's pids (rank, shim, grandchild)."""

    def __init__(self, on_pids: Callable[[Collector], None] | None = None) -> None:
        self.lines: list[str] = []
        self.pids: dict[int, tuple[int, int, int]] = {}
        self.on_pids = on_pids
        self.all_pids_seen = threading.Event()

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        match = PIDS.match(line)
        if match:
            self.pids[int(match[1])] = (int(match[3]), int(match[4]), int(match[5]))
            if self.on_pids is not None:
                self.on_pids(self)

    def every_pid(self) -> list[int]:
        return [pid for triple in self.pids.values() for pid in triple]


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_gone(pids: Iterable[int], deadline: float) -> list[int]:
    """Poll until every pid is gone or `deadline` (monotonic) passes; return the survivors."""
    pids = list(pids)
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)  # polling a condition with a deadline, not synchronising on time


def specs_for(scripts: dict[int, str], tmp_path: Path, *, extra: dict[int, list[str]] | None = None,
              env: dict[str, str] | None = None) -> list[RankSpec]:
    extra = extra or {}
    return [RankSpec(rank=r, host_name="local", local_rank=r, argv=[PY, "-c", code, *extra.get(r, [])],
                     env={"RANK": str(r), **(env or {})}, cwd=str(tmp_path), python=PY)
            for r, code in scripts.items()]


def open_gate_when(fifo: Path, ready: Callable[[Collector], bool]) -> Callable[[Collector], None]:
    """An on_pids hook that, once `ready`, opens the FIFO for writing (in a thread: open blocks)."""
    opened = threading.Event()

    def hook(collector: Collector) -> None:
        if ready(collector) and not opened.is_set():
            opened.set()
            threading.Thread(target=lambda: fifo.write_text("go"), daemon=True).start()
    return hook


def states(result: RunResult) -> dict[int, RankState]:
    return {r.rank: r.state for r in result.ranks}


def test_ranks_that_succeed_stream_prefixed_lines_and_write_logs(tmp_path: Path) -> None:
    code = ("import os, sys\nr = os.environ['RANK']\nprint(f'rank={r}')\n"
            "print(f'warn from {r}', file=sys.stderr)\nsys.stdout.write(f'tail {r}')")
    emit = Collector()
    specs = local_rank_specs([PY, "-c", code], 3, lambda r: {"RANK": str(r)}, str(tmp_path), PY)
    result = run_ranks(specs, log_dir=tmp_path / "logs", emit=emit, grace=1.0)

    assert result.exit_code == 0 and not result.interrupted and result.first_failure is None
    assert states(result) == {0: RankState.SUCCEEDED, 1: RankState.SUCCEEDED, 2: RankState.SUCCEEDED}
    assert len(emit.lines) == 9
    for line in emit.lines:
        match = re.match(r"^\[rank (\d) local\] (rank=|warn from |tail )(\d)$", line)
        assert match and match[1] == match[3], line
    for r in range(3):
        logged = (tmp_path / "logs" / f"rank-{r}.log").read_text().splitlines()
        assert sorted(logged) == sorted([f"rank={r}", f"warn from {r}", f"tail {r}"])
        rank = result.ranks[r]
        assert rank.exit_code == 0 and rank.log_path == tmp_path / "logs" / f"rank-{r}.log"
        assert f"tail {r}" in rank.last_lines  # the partial last line was flushed at EOF


def test_first_failure_tears_down_the_others_and_their_children(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    emit = Collector(open_gate_when(gate, lambda c: len(c.pids) == 3))
    specs = specs_for({0: BLOCK, 1: FAIL_AFTER_GATE, 2: BLOCK}, tmp_path, extra={1: [str(gate)]})
    result = run_ranks(specs, log_dir=tmp_path / "logs", emit=emit, grace=2.0)

    assert result.exit_code == 1 and not result.interrupted
    first = result.first_failure
    assert first is not None and first.rank == 1 and first.state is RankState.FAILED
    assert first.exit_code == 3 and first.reason == "exit code 3"
    # stdout and stderr are separate pipes: their relative order is not kept, only each one's own.
    assert sorted(first.last_lines[-2:]) == ["ValueError: shard 7 is truncated", "loading shard 7"]
    assert states(result) == {0: RankState.KILLED, 1: RankState.FAILED, 2: RankState.KILLED}
    for r in (0, 2):
        assert "rank 1 (local) failed" in result.ranks[r].reason and "SIGTERM" in result.ranks[r].reason
    assert first.ended is not None
    assert wait_gone(emit.every_pid(), first.ended + 5.0) == []
    assert "[macrun] rank 1 (local) failed; stopping 2 other ranks" in emit.lines

    console = Console(record=True, width=140)
    console.print(render_failure_table(result))
    text = console.export_text()
    rows = [line for line in text.splitlines() if re.search(r"\b(failed|killed)\b", line)]
    assert "failed" in rows[0] and "exit code 3" in rows[0]  # the root cause comes first
    assert text.index("last lines of rank 1") < text.index("ValueError: shard 7 is truncated")


def test_rank_killed_from_outside_is_failed_with_its_signal(tmp_path: Path) -> None:
    def kill_rank_1(c: Collector) -> None:
        if len(c.pids) == 3 and not c.all_pids_seen.is_set():
            c.all_pids_seen.set()
            os.kill(c.pids[1][0], signal.SIGKILL)

    emit = Collector(kill_rank_1)
    result = run_ranks(specs_for({0: BLOCK, 1: BLOCK, 2: BLOCK}, tmp_path), log_dir=tmp_path / "logs",
                       emit=emit, grace=2.0)

    assert result.exit_code == 1
    first = result.first_failure
    assert first is not None and first.rank == 1 and first.state is RankState.FAILED
    assert first.exit_code == 137 and "SIGKILL" in first.reason
    assert states(result) == {0: RankState.KILLED, 1: RankState.FAILED, 2: RankState.KILLED}
    assert first.ended is not None
    assert wait_gone(emit.every_pid(), first.ended + 5.0) == []


def test_rank_ignoring_sigterm_is_sigkilled_after_grace(tmp_path: Path) -> None:
    stubborn = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + BLOCK
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    emit = Collector(open_gate_when(gate, lambda c: len(c.pids) == 2))
    grace = 0.5
    result = run_ranks(specs_for({0: FAIL_AFTER_GATE, 1: stubborn}, tmp_path, extra={0: [str(gate)]}),
                       log_dir=tmp_path / "logs", emit=emit, grace=grace)

    assert result.exit_code == 1 and states(result) == {0: RankState.FAILED, 1: RankState.KILLED}
    killed, first = result.ranks[1], result.first_failure
    assert first is not None and first.ended is not None and killed.ended is not None
    assert killed.exit_code == 137 and "SIGKILL" in killed.reason
    assert grace <= killed.ended - first.ended < grace + 3.0
    assert wait_gone(emit.every_pid(), killed.ended + 5.0) == []


def stop_shim_then_open_gate(gate: Path, stuck_rank: int, ranks: int) -> Callable[[Collector], None]:
    """Once every rank is up, freeze `stuck_rank`'s shim (SIGSTOP) and let the failing rank go."""
    release = open_gate_when(gate, lambda c: len(c.pids) == ranks)

    def hook(c: Collector) -> None:
        if len(c.pids) == ranks and not c.all_pids_seen.is_set():
            c.all_pids_seen.set()
            os.kill(c.pids[stuck_rank][1], signal.SIGSTOP)
        release(c)
    return hook


def test_stuck_shim_is_stopped_hard_by_the_launcher(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    emit = Collector(stop_shim_then_open_gate(gate, stuck_rank=1, ranks=2))
    grace = 0.3
    result = run_ranks(specs_for({0: FAIL_AFTER_GATE, 1: BLOCK}, tmp_path, extra={0: [str(gate)]}),
                       log_dir=tmp_path / "logs", emit=emit, grace=grace)

    assert result.exit_code == 1 and states(result) == {0: RankState.FAILED, 1: RankState.KILLED}
    first, stuck = result.first_failure, result.ranks[1]
    assert first is not None and first.ended is not None and stuck.ended is not None
    # The frozen shim never acted on "TERM": the launcher's own hard stop (after grace) killed it all.
    assert stuck.exit_code == 137 and stuck.ended - first.ended >= grace + HARD_STOP_MARGIN_S
    assert wait_gone(emit.every_pid(), stuck.ended + 5.0) == []


def test_missing_program_fails_with_127_and_the_shims_message(tmp_path: Path) -> None:
    specs = [RankSpec(rank=0, host_name="local", local_rank=0, argv=["nonexistent-binary"], env={},
                      cwd=str(tmp_path), python=PY), *specs_for({1: BLOCK}, tmp_path)]
    emit = Collector()
    result = run_ranks(specs, log_dir=tmp_path / "logs", emit=emit, grace=1.0)

    assert result.exit_code == 1
    first = result.first_failure
    assert first is not None and first.rank == 0 and first.exit_code == 127
    message = "macrun: cannot start 'nonexistent-binary': No such file or directory"
    assert first.last_lines == [message]
    assert first.reason == "exit code 127: cannot start 'nonexistent-binary': No such file or directory"
    assert f"[rank 0 local] {message}" in emit.lines
    assert result.ranks[1].state is RankState.KILLED
    assert wait_gone(emit.every_pid(), time.monotonic() + 5.0) == []


def test_shim_that_cannot_start_fails_its_rank_and_stops_the_rest(tmp_path: Path) -> None:
    specs = specs_for({0: BLOCK, 1: BLOCK, 2: BLOCK}, tmp_path)
    specs[1] = RankSpec(rank=1, host_name="local", local_rank=1, argv=["true"], env={}, cwd=str(tmp_path),
                        python=str(tmp_path / "no-python"))
    emit = Collector()
    result = run_ranks(specs, log_dir=tmp_path / "logs", emit=emit, grace=1.0)

    assert result.exit_code == 1
    assert states(result) == {0: RankState.KILLED, 1: RankState.FAILED, 2: RankState.PENDING}
    first = result.first_failure
    assert first is not None and first.rank == 1 and first.exit_code is None
    assert first.reason.startswith("could not start: ") and "no-python" in first.reason
    assert result.ranks[2].reason.startswith("not started")
    assert wait_gone(emit.every_pid(), time.monotonic() + 5.0) == []


# ---- caffeinate: the shim keeps the machine awake while its rank lives ----------------------------------

# Stands in for macOS's caffeinate: records its pid and argv (atomically), then ignores -w and stays, so
# only the shim itself can be what stops it.
FAKE_CAFFEINATE = """#!/bin/sh
echo "$$ $*" > "$CAFFEINATE_RECORD.tmp" && mv "$CAFFEINATE_RECORD.tmp" "$CAFFEINATE_RECORD"
exec sleep 600
"""
# A rank that prints its pid, waits (bounded) until caffeinate has started, then fails with 3.
WAIT_FOR_CAFFEINATE = """
import os, sys, time
print(os.getpid(), flush=True)
deadline = time.monotonic() + 20
while sys.argv[1] and not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
    time.sleep(0.02)
sys.exit(3)
"""


def run_shim(tmp_path: Path, env: dict[str, str], record: str = "") -> tuple[int, str]:
    """Run one rank through `python -m distributed.rankshim` directly; its exit code and stdout."""
    request = {"argv": [PY, "-c", WAIT_FOR_CAFFEINATE, record], "env": {}, "cwd": str(tmp_path), "grace": 1.0}
    shim = subprocess.Popen([PY, "-u", "-m", "distributed.rankshim"], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert shim.stdin is not None and shim.stdout is not None
    shim.stdin.write((json.dumps(request) + "\n").encode())
    shim.stdin.flush()  # stdin stays open: EOF would tell the shim to stop the rank
    out = shim.stdout.read().decode()
    code = shim.wait(timeout=30)
    shim.stdin.close()
    return code, out


def test_rank_runs_under_caffeinate_that_ends_with_it(tmp_path: Path) -> None:
    bin_dir, record = tmp_path / "bin", tmp_path / "caffeinate.txt"
    bin_dir.mkdir()
    (bin_dir / "caffeinate").write_text(FAKE_CAFFEINATE)
    (bin_dir / "caffeinate").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "MACRUN_CAFFEINATE": "1",
           "CAFFEINATE_RECORD": str(record)}
    code, out = run_shim(tmp_path, env, str(record))

    assert code == 3  # the rank's own exit code, caffeinate or not
    program = int(out.split()[0])
    caffeinate, argv = record.read_text().split(" ", 1)
    assert argv.split() == ["-i", "-s", "-w", str(program)]
    assert wait_gone([int(caffeinate)], time.monotonic() + 5.0) == []


def test_rank_runs_without_caffeinate_when_it_is_missing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "PATH": str(tmp_path / "empty"), "MACRUN_CAFFEINATE": "1"}
    code, out = run_shim(tmp_path, env)
    assert code == 3 and out.strip().isdigit()


def test_heartbeat_loss_marks_the_rank_lost(tmp_path: Path) -> None:
    emit = Collector()
    calls: list[dict[int, float]] = []

    def ages() -> dict[int, float]:
        # Rank 1 has sent heartbeats and then went quiet; rank 0 never sent any (not judged).
        answer = {1: 120.0} if len(emit.pids) == 2 else {1: 0.1}
        calls.append(answer)
        return answer

    result = run_ranks(specs_for({0: BLOCK, 1: BLOCK}, tmp_path), log_dir=tmp_path / "logs", emit=emit,
                       heartbeat_ages=ages, heartbeat_timeout=0.4, grace=1.0)

    assert result.exit_code == 1 and states(result) == {0: RankState.KILLED, 1: RankState.LOST}
    first = result.first_failure
    assert first is not None and first.rank == 1
    assert first.reason.startswith("no heartbeat for 120.0 s (timeout 0.4 s)")
    assert {1: 0.1} in calls  # a fresh heartbeat below the timeout did not count as lost
    assert wait_gone(emit.every_pid(), time.monotonic() + 5.0) == []


def test_secret_never_appears_on_a_command_line(tmp_path: Path) -> None:
    secret = "s3cret-" + os.urandom(8).hex()
    fifos = [tmp_path / f"gate{r}" for r in range(2)]
    for fifo in fifos:
        os.mkfifo(fifo)
    emit = Collector()
    specs = specs_for({0: SECRET_RANK, 1: SECRET_RANK}, tmp_path, env={"MACRUN_SECRET": secret},
                      extra={r: [str(fifos[r])] for r in range(2)})
    results: queue.Queue[RunResult] = queue.Queue()
    runner = threading.Thread(target=lambda: results.put(
        run_ranks(specs, log_dir=tmp_path / "logs", emit=emit, grace=1.0)), daemon=True)
    runner.start()
    deadline = time.monotonic() + 20
    while len(emit.pids) < 2 and time.monotonic() < deadline and runner.is_alive():
        time.sleep(0.02)  # polling a condition with a deadline
    assert len(emit.pids) == 2, emit.lines

    leaks = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if secret.encode() in cmdline:
                leaks.append((proc.name, cmdline))
    for fifo in fifos:
        fifo.write_text("go")
    result = results.get(timeout=20)

    assert leaks == []
    assert result.exit_code == 0
    digest = hashlib.sha256(secret.encode()).hexdigest()
    assert sorted(line for line in emit.lines if " sha " in line) == [
        f"[rank 0 local] sha {digest}", f"[rank 1 local] sha {digest}"]  # yet the ranks got it


DRIVER = """
import json, sys
from pathlib import Path
from launcher.jobs.job import local_rank_specs, run_ranks
work, code = sys.argv[1], sys.argv[2]
specs = local_rank_specs([sys.executable, "-c", code], 2, lambda r: {"RANK": str(r)}, work, sys.executable)
result = run_ranks(specs, log_dir=Path(work) / "logs", emit=lambda line: print(line, flush=True), grace=1.0)
print("RESULT " + json.dumps({"states": [r.state.value for r in result.ranks],
                              "interrupted": result.interrupted}), flush=True)
sys.exit(result.exit_code)
"""


def start_driver(tmp_path: Path) -> tuple[subprocess.Popen[str], Collector, queue.Queue[str]]:
    """A real driver process running run_ranks; its output is collected on a thread."""
    driver = subprocess.Popen([PY, "-c", DRIVER, str(tmp_path), BLOCK], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    emit, lines = Collector(), queue.Queue[str]()

    def read() -> None:
        assert driver.stdout is not None
        for line in driver.stdout:
            emit(line.rstrip("\n"))
            lines.put(line.rstrip("\n"))
    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 20
    while len(emit.pids) < 2 and time.monotonic() < deadline:
        try:
            lines.get(timeout=0.5)
        except queue.Empty:
            assert driver.poll() is None, "the driver exited early"
    assert len(emit.pids) == 2, emit.lines
    return driver, emit, lines


def test_sigint_to_the_driver_stops_everything_with_130(tmp_path: Path) -> None:
    driver, emit, lines = start_driver(tmp_path)
    driver.send_signal(signal.SIGINT)
    assert driver.wait(timeout=20) == 130
    result_line = next(line for line in emit.lines if line.startswith("RESULT "))
    assert json.loads(result_line[7:]) == {"states": ["killed", "killed"], "interrupted": True}
    assert wait_gone(emit.every_pid(), time.monotonic() + 5.0) == []


def test_driver_killed_by_sigkill_leaves_no_orphans(tmp_path: Path) -> None:
    driver, emit, _ = start_driver(tmp_path)
    driver.kill()
    driver.wait(timeout=10)
    # The shims see EOF on stdin and stop their ranks; nobody is left to tell them otherwise.
    assert wait_gone(emit.every_pid(), time.monotonic() + 5.0) == []
