"""`macrun run` on three emulated hosts, driven as a user would: correct collectives, logs, and teardown.

Each test runs the real `macrun` console script in a subprocess with the lab's HOME and a hosts file,
then checks what it printed, its exit code and the processes left on the hosts.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from tests.lab.labnet import Lab, wait_until
from tests.lab.scripts.macrun_proc import SCRIPTS, MacrunProcess, run_macrun

pytestmark = pytest.mark.timeout(90)

TEARDOWN_S = 5.0  # the bound: after a failure or Ctrl-C, nothing of the run is left after 5 s


def no_strays(lab: Lab) -> bool:
    return all(lab.stray_pids(h) == [] for h in lab.hosts)


def strays(lab: Lab) -> dict[str, list[int]]:
    return {h.name: lab.stray_pids(h) for h in lab.hosts}


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie is not running: its parent just has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def rank_lines(stdout: str) -> dict[int, tuple[str, str]]:
    """rank -> (host name, text) for every `[rank R host] text` line."""
    found: dict[int, tuple[str, str]] = {}
    for m in re.finditer(r"^\[rank (\d+) (\S+)\] (.*)$", stdout, re.M):
        found[int(m.group(1))] = (m.group(2), m.group(3))
    return found


@pytest.mark.parametrize("slots", [1, 2], ids=["3-ranks", "6-ranks-2-slots"])
def test_unmodified_mlx_script_runs_on_every_host(lab: Lab, tmp_path: Path, slots: int) -> None:
    hosts = lab.write_hosts_file(tmp_path / "hosts.json", slots=slots)
    name = f"allsum{slots}"
    proc = run_macrun(["run", "--hosts", str(hosts), "--name", name, "--", "python", str(SCRIPTS / "allsum.py")],
                      home=lab.ssh_home, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    world = 3 * slots
    lines = rank_lines(proc.stdout)
    assert sorted(lines) == list(range(world)), proc.stdout
    for rank, (host, text) in lines.items():
        assert host == f"h{rank // slots}", f"rank {rank} ran on {host}: ranks fill hosts in file order"
        assert text == (f"world={world} rank={rank} sum={world * (world + 1) // 2:g} "
                        f"gather={list(range(world))}")
        log = tmp_path / "runs" / name / "logs" / f"rank-{rank}.log"
        assert log.read_text().splitlines() == [text], f"{log} must hold the rank's own output, unprefixed"
    assert "Traceback" not in proc.stdout + proc.stderr
    wait_until(lambda: no_strays(lab), TEARDOWN_S, "the hosts to be clean after a successful run")


def test_kill_9_of_one_rank_stops_every_rank_everywhere(lab: Lab, tmp_path: Path) -> None:
    hosts = lab.write_hosts_file(tmp_path / "hosts.json")
    with MacrunProcess(["run", "--hosts", str(hosts), "--name", "kill9", "--",
                        "python", str(SCRIPTS / "block.py"), "wait"], home=lab.ssh_home, cwd=tmp_path) as run:
        pids = {r: int(run.wait_for(rf"^\[rank {r} h{r}\] pid=(\d+) rank={r} world=3", 60).group(1))
                for r in range(3)}
        assert all(alive(p) for p in pids.values())
        killed = lab.exec(lab.host("h1"), ["kill", "-9", str(pids[1])])
        assert killed.returncode == 0, killed.stderr
        t0 = time.monotonic()
        wait_until(lambda: not any(alive(p) for p in pids.values()), TEARDOWN_S,
                   "the other ranks to be stopped after rank 1 was killed")
        wait_until(lambda: no_strays(lab), TEARDOWN_S - (time.monotonic() - t0),
                   f"no process of the run left on any host (left: {strays(lab)})")
        assert run.finish(timeout=10) == 1
    table = run.stderr
    rows = {int(m.group(1)): m.group(0) for m in re.finditer(r"^\W*(\d+)\s+│\s*h\d.*$", table, re.M)}
    assert sorted(rows) == [0, 1, 2], table
    assert "failed" in rows[1] and "137" in rows[1] and "SIGKILL" in rows[1], table
    assert all("killed" in rows[r] and "rank 1 (h1) failed" in rows[r] for r in (0, 2)), table
    first_row = next(m.group(1) for m in re.finditer(r"^\W*(\d+)\s+│", table, re.M))
    assert first_row == "1", f"the root cause comes first:\n{table}"
    assert "last lines of rank 1 (h1)" in table
    assert "Traceback" not in run.stdout + run.stderr


def test_ctrl_c_stops_every_rank_and_exits_130(lab: Lab, tmp_path: Path) -> None:
    hosts = lab.write_hosts_file(tmp_path / "hosts.json")
    with MacrunProcess(["run", "--hosts", str(hosts), "--name", "sigint", "--",
                        "python", str(SCRIPTS / "block.py"), "ring"], home=lab.ssh_home, cwd=tmp_path) as run:
        pids = [int(run.wait_for(rf"^\[rank {r} h{r}\] pid=(\d+) rank={r}", 60).group(1)) for r in range(3)]
        assert not no_strays(lab)
        run.interrupt()
        t0 = time.monotonic()
        wait_until(lambda: not any(alive(p) for p in pids), TEARDOWN_S, "Ctrl-C to stop every rank")
        wait_until(lambda: no_strays(lab), TEARDOWN_S - (time.monotonic() - t0),
                   f"no process of the run left on any host (left: {strays(lab)})")
        assert run.finish(timeout=10) == 130
    assert "Traceback" not in run.stdout + run.stderr
    assert "interrupted" in run.stdout + run.stderr
    assert os.path.isdir(tmp_path / "runs" / "sigint" / "logs")


def test_a_project_runs_as_typed_imports_modules_and_paths_included(lab: Lab, tmp_path: Path) -> None:
    # What failed before: a script importing a module beside it got ModuleNotFoundError on every host.
    proj = tmp_path / "proj"
    (proj / "pkg").mkdir(parents=True)
    (proj / "data").mkdir()
    (proj / "helper.py").write_text("def greet(rank):\n    return f'helper says hi to {rank}'\n")
    (proj / "train.py").write_text(
        "import os, helper\n"
        "rank = int(os.environ['RANK'])\n"
        "print(helper.greet(rank), open('data/words.txt').read().strip(), os.path.basename(os.getcwd()), "
        "flush=True)\n")
    (proj / "pkg" / "__init__.py").write_text("")
    (proj / "pkg" / "util.py").write_text("NAME = 'util'\n")
    (proj / "pkg" / "main.py").write_text("from pkg import util\nimport os\n"
                                          "print('module', util.NAME, os.environ['RANK'], flush=True)\n")
    (proj / "data" / "words.txt").write_text("plain words\n")
    (proj / "runs").mkdir()
    (proj / "runs" / "huge.log").write_text("never copied\n")
    hosts = lab.write_hosts_file(tmp_path / "hosts.json")

    proc = run_macrun(["run", "--hosts", str(hosts), "--name", "proj", "--", "python", "train.py"],
                      home=lab.ssh_home, cwd=proj)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = rank_lines(proc.stdout)
    assert {r: t for r, (_, t) in lines.items()} == {r: f"helper says hi to {r} plain words project" for r in range(3)}
    assert re.search(r"^project \S*proj: 6 file\(s\)", proc.stdout, re.M), proc.stdout

    proc = run_macrun(["run", "--hosts", str(hosts), "--name", "proj", "--", "python", "-m", "pkg.main"],
                      home=lab.ssh_home, cwd=proj)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {r: t for r, (_, t) in rank_lines(proc.stdout).items()} == {r: f"module util {r}" for r in range(3)}
    # The second launch of the same project sends only the new hostfile to each host.
    sent = re.search(r"^synced \d+ files to 3 host\(s\): (\d+) sent", proc.stdout, re.M)
    assert sent is not None and int(sent.group(1)) == 3, proc.stdout
    job = lab.exec(lab.host("h1"), ["ls", "-A", f"{lab.hosts[1].workdir}/jobs/proj/project"])
    copied = sorted(n for n in job.stdout.split() if n != "__pycache__")  # written there by the imports
    assert copied == ["data", "helper.py", "pkg", "train.py"], job.stdout + job.stderr
