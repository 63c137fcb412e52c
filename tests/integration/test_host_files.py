"""What macrun leaves on a host, over a real sshd: `~` in hosts.json paths, and private job folders.

The sshd logs in as this machine's user, whose home on the "host" is the real one (the client's HOME is
isolated as everywhere else), so these tests work in a fresh folder there and remove it afterwards.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.jobs import remote
from launcher.jobs.api import LaunchSpec, launch
from launcher.room import preflight
from launcher.room.hosts import HostSpec
from launcher.transport import ssh, sync
from tests.support.sshd import SshdHandle, requires_openssh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180), requires_openssh]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def host_home() -> str:
    """The login user's home folder on the "host" (where `~` points there)."""
    return pwd.getpwuid(os.getuid()).pw_dir


@pytest.fixture
def area(host_home: str) -> Iterator[Path]:
    """A fresh folder under the host-side home, with `venv` linked to this checkout's virtualenv."""
    path = Path(tempfile.mkdtemp(prefix=".macrun-test-", dir=host_home))
    (path / "venv").symlink_to(REPO / ".venv")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def tilde(path: Path, host_home: str) -> str:
    return "~/" + str(path.relative_to(host_home))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_tilde_in_python_and_workdir_means_the_hosts_home(ssh_home: Path, server: SshdHandle, area: Path,
                                                          host_home: str) -> None:
    spec = HostSpec(name="loop", hostname=server.host, port=server.port,
                    python=tilde(area, host_home) + "/venv/bin/python", workdir=tilde(area, host_home) + "/work")
    with ssh.connect(spec) as conn:
        assert conn.host.python == f"{area}/venv/bin/python" and conn.host.workdir == f"{area}/work"
        facts = preflight.probe_host(conn, ports=2)  # before: "Python interpreter '~/…' not found"
        assert facts.python_executable == f"{area}/venv/bin/python"
        assert len(set(facts.free_ports)) == 2 and all(p > 0 for p in facts.free_ports)
        report = sync.sync_files(conn, {"a.txt": REPO / "pyproject.toml"}, conn.host.workdir + "/jobs/x")
        assert report.remote_dir == f"{area}/work/jobs/x" and (area / "work/jobs/x/a.txt").is_file()


def test_job_folders_and_files_are_private(ssh_home: Path, server: SshdHandle, area: Path, tmp_path: Path) -> None:
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\necho run\n")
    script.chmod(0o755)
    text = tmp_path / "train.txt"
    text.write_text("private training text\n")
    files = {"data/train.txt": text, "bin/run.sh": script}
    old = area / "work" / "jobs" / "old"  # what an older macrun left: world-readable
    (old / "data").mkdir(parents=True, mode=0o755)
    old.chmod(0o755)
    shutil.copyfile(text, old / "data" / "train.txt")
    (old / "data" / "train.txt").chmod(0o644)
    spec = HostSpec(name="loop", hostname=server.host, port=server.port, python=sys.executable)
    with ssh.connect(spec) as conn:
        new = area / "work2" / "jobs" / "new"
        sync.sync_files(conn, files, str(new))
        for folder in (area / "work2", area / "work2" / "jobs", new, new / "data", new / "bin"):
            assert mode(folder) == 0o700, folder
        assert mode(new / "data" / "train.txt") == 0o600 and mode(new / "bin" / "run.sh") == 0o700
        assert conn.run(str(new / "bin" / "run.sh")).stdout == "run\n"

        report = sync.sync_files(conn, files, str(old))
        assert report.skipped == 1  # same bytes: not sent again, yet made private
        assert mode(old) == 0o700 and mode(old / "data" / "train.txt") == 0o600

        hostfile = tmp_path / "mlx_hostfile.json"
        hostfile.write_text("[]")
        hostfile.chmod(0o644)
        remote._push_hostfile([conn], hostfile, {"loop": str(new)})
        assert mode(new / "mlx_hostfile.json") == 0o600


def test_run_with_tilde_python_starts_ranks_in_a_private_job_folder(ssh_home: Path, server: SshdHandle,
                                                                    area: Path, host_home: str,
                                                                    tmp_path: Path) -> None:
    host = HostSpec(name="loop", hostname=server.host, port=server.port, user="root",
                    python=tilde(area, host_home) + "/venv/bin/python", workdir=tilde(area, host_home) + "/w")
    lines: list[str] = []
    result = launch(LaunchSpec(argv=["python", "-c", "import os, sys; print('exe', sys.executable, os.getcwd())"],
                               run_dir=tmp_path / "run", hosts=[host], min_battery=0.0), emit=lines.append)
    job = area / "w" / "jobs" / "run"
    assert result.exit_code == 0, "\n".join(lines)
    assert f"[rank 0 loop] exe {area}/venv/bin/python {job}" in lines
    assert [mode(p) for p in (area / "w", area / "w" / "jobs", job, job / "distributed")] == [0o700] * 4
    assert mode(job / "mlx_hostfile.json") == 0o600 and mode(job / "distributed" / "rankshim.py") == 0o600
