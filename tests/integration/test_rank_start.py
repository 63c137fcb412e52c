"""Starting ranks fast: shims started before their requests exist (SSH), and hosts started in parallel."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.jobs.job import LocalLauncher, RankSpec, RankState, SSHLauncher, run_ranks
from launcher.jobs.rankio import TrackedRank, start_shims
from launcher.room.hosts import HostSpec
from launcher.transport import ssh
from tests.integration.test_job import BLOCK, Collector, states
from tests.support.sshd import SshdHandle, requires_openssh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def spec(rank: int, host: str, code: str, cwd: Path, python: str = PY) -> RankSpec:
    return RankSpec(rank=rank, host_name=host, local_rank=0, argv=[PY, "-c", code], env={}, cwd=str(cwd),
                    python=python)


def shims_of(python: Path) -> list[int]:
    """Pids of processes whose command line names `python` (a path unique to the test)."""
    found = subprocess.run(["pgrep", "-f", str(python)], capture_output=True, text=True).stdout
    return [int(p) for p in found.split()]


def wait_for(predicate, seconds: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def conn(ssh_home: Path, server: SshdHandle) -> Iterator[ssh.SSHConnection]:
    connection = ssh.connect(HostSpec(name="loop", hostname=server.host, port=server.port), timeout=10)
    yield connection
    connection.close()


@pytest.fixture
def unique_python(tmp_path: Path) -> Path:
    """This interpreter under a name only this test uses, so its shims can be found on the host (this machine)."""
    path = tmp_path / "python-for-shims"
    path.symlink_to(PY)
    return path


@requires_openssh
def test_a_prestarted_shim_runs_the_rank(tmp_path: Path, conn: ssh.SSHConnection, unique_python: Path) -> None:
    launcher = SSHLauncher(conn, str(ROOT))
    launcher.prestart(str(unique_python), 1)
    assert wait_for(lambda: len(shims_of(unique_python)) == 1, 20), "the shim did not start"
    (waiting,) = shims_of(unique_python)
    code = "import os; print('shim', os.getppid())"
    emit = Collector()
    result = run_ranks([spec(0, "loop", code, tmp_path, python=str(unique_python))], launchers={"loop": launcher},
                       log_dir=tmp_path / "logs", emit=emit, grace=1.0)

    assert result.exit_code == 0, emit.lines
    assert f"[rank 0 loop] shim {waiting}" in emit.lines, "the rank ran under the shim started beforehand"


@requires_openssh
def test_shims_nobody_asked_for_end_without_running_anything(conn: ssh.SSHConnection, unique_python: Path) -> None:
    launcher = SSHLauncher(conn, str(ROOT))
    launcher.prestart(str(unique_python), 2)
    assert wait_for(lambda: len(shims_of(unique_python)) == 2, 20), "the shims did not start"

    launcher.discard()
    assert wait_for(lambda: shims_of(unique_python) == [], 10), "a discarded shim is still running"


@requires_openssh
def test_a_shim_prestarted_for_another_python_is_not_used(tmp_path: Path, conn: ssh.SSHConnection,
                                                          unique_python: Path) -> None:
    launcher = SSHLauncher(conn, str(ROOT))
    launcher.prestart(str(unique_python), 1)
    assert wait_for(lambda: len(shims_of(unique_python)) == 1, 20)
    emit = Collector()
    result = run_ranks([spec(0, "loop", "print('ran')", tmp_path)], launchers={"loop": launcher},
                       log_dir=tmp_path / "logs", emit=emit, grace=1.0)

    assert result.exit_code == 0 and "[rank 0 loop] ran" in emit.lines, emit.lines
    assert wait_for(lambda: shims_of(unique_python) == [], 10), "the unused shim was left running"


def test_a_host_that_cannot_start_stops_the_ranks_started_on_others(tmp_path: Path) -> None:
    specs = [spec(0, "a", "print('never')", tmp_path, python=str(tmp_path / "no-python")),
             spec(1, "a", "print('never')", tmp_path),
             spec(2, "b", BLOCK, tmp_path)]
    emit = Collector()
    result = run_ranks(specs, launchers={"a": LocalLauncher(), "b": LocalLauncher()}, log_dir=tmp_path / "logs",
                       emit=emit, grace=1.0)

    assert result.exit_code == 1
    assert states(result) == {0: RankState.FAILED, 1: RankState.PENDING, 2: RankState.KILLED}
    assert result.first_failure is not None and result.first_failure.rank == 0
    assert result.ranks[1].reason.startswith("not started")


class _MeetingLauncher:
    """Starts nothing: each start waits until the other host's start is under way too (or gives up)."""

    def __init__(self, barrier: threading.Barrier, fail: bool = False) -> None:
        self.barrier, self.fail, self.started = barrier, fail, []

    def start(self, spec: RankSpec, request: bytes) -> object:
        self.barrier.wait(timeout=10)  # BrokenBarrierError if the hosts were started one after the other
        if self.fail:
            raise OSError("no such interpreter")
        self.started.append(spec.rank)
        return object()


def test_hosts_start_at_once_and_a_host_stops_at_its_first_failure(tmp_path: Path) -> None:
    barrier = threading.Barrier(2)
    a, b = _MeetingLauncher(barrier, fail=True), _MeetingLauncher(barrier)
    ranks = [TrackedRank(spec=spec(r, h, "", tmp_path), log=None, log_path=tmp_path)  # type: ignore[arg-type]
             for r, h in ((0, "a"), (1, "b"), (2, "a"))]
    started = start_shims(ranks, {0: a, 1: b, 2: a}, lambda s: b"")  # type: ignore[dict-item]

    assert isinstance(started[0], OSError) and started[2] is None, "host a tries nothing after its failure"
    assert started[1] is not None and b.started == [1]
