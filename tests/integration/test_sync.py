"""launcher.transport.sync over a real sshd on loopback: only changed files travel, atomically, exec bit kept."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.room.hosts import HostSpec
from launcher.transport import ssh, sync
from tests.support.sshd import SshdHandle, requires_openssh

REPO = Path(__file__).resolve().parents[2]

pytestmark = requires_openssh


@pytest.fixture
def conn(server: SshdHandle, ssh_home: Path) -> Iterator[ssh.SSHConnection]:
    spec = HostSpec(name="loop", hostname=server.host, port=server.port, python=sys.executable)
    with ssh.connect(spec) as c:
        yield c


@pytest.fixture
def job(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "config.yaml").write_text("model: tiny\n")
    (src / "pkg" / "mod.py").write_text("X = 1\n")
    run = src / "run.sh"
    run.write_text("#!/bin/sh\necho run\n")
    run.chmod(0o755)
    return {"config.yaml": src / "config.yaml", "pkg/mod.py": src / "pkg" / "mod.py", "bin/run.sh": run}


@pytest.mark.integration
def test_sends_only_what_changed(conn: ssh.SSHConnection, job: dict[str, Path], tmp_path: Path) -> None:
    remote = tmp_path / "remote" / "run-1"  # loopback: the "remote" folder is visible here too
    first = sync.sync_files(conn, job, str(remote))
    assert (first.sent, first.skipped) == (3, 0)
    assert first.bytes_sent == sum(p.stat().st_size for p in job.values())
    assert first.remote_dir == str(remote)
    for rel, local in job.items():
        assert (remote / rel).read_bytes() == local.read_bytes()

    second = sync.sync_files(conn, job, str(remote))
    assert (second.sent, second.skipped, second.bytes_sent) == (0, 3, 0)

    job["pkg/mod.py"].write_text("X = 2  # changed\n")
    third = sync.sync_files(conn, job, str(remote))
    assert (third.sent, third.skipped) == (1, 2)
    assert third.bytes_sent == job["pkg/mod.py"].stat().st_size
    assert (remote / "pkg" / "mod.py").read_text() == "X = 2  # changed\n"

    (remote / "config.yaml").write_text("tampered on the host\n")
    assert sync.sync_files(conn, job, str(remote)).sent == 1
    assert (remote / "config.yaml").read_text() == "model: tiny\n"
    leftovers = [p.name for p in remote.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []  # every upload was renamed into place


@pytest.mark.integration
def test_exec_bit_travels(conn: ssh.SSHConnection, job: dict[str, Path], tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    sync.sync_files(conn, job, str(remote))
    assert (remote / "bin" / "run.sh").stat().st_mode & stat.S_IXUSR
    assert not (remote / "config.yaml").stat().st_mode & stat.S_IXUSR
    assert conn.run(f"{remote}/bin/run.sh").stdout == "run\n"
    job["config.yaml"].chmod(0o755)  # same bytes, new mode: must be sent again
    report = sync.sync_files(conn, job, str(remote))
    assert report.sent == 1 and (remote / "config.yaml").stat().st_mode & stat.S_IXUSR


@pytest.mark.integration
def test_sync_all_in_parallel(conn: ssh.SSHConnection, server: SshdHandle,
                              job: dict[str, Path], tmp_path: Path) -> None:
    handle = server
    other = ssh.connect(HostSpec(name="loop2", hostname=handle.host, port=handle.port, python=sys.executable))
    try:
        dirs = {"loop": str(tmp_path / "a"), "loop2": str(tmp_path / "b")}
        reports = sync.sync_all([conn, other], job, dirs)
        assert {n: r.sent for n, r in reports.items()} == {"loop": 3, "loop2": 3}
        assert (tmp_path / "b" / "pkg" / "mod.py").read_text() == "X = 1\n"
    finally:
        other.close()


def test_remote_script_expands_home(tmp_path: Path) -> None:
    # The hashing script runs on the host; here it runs locally with HOME pointed at tmp_path.
    (tmp_path / "w" / "d").mkdir(parents=True)
    (tmp_path / "w" / "d" / "f").write_bytes(b"abc")
    env = {**os.environ, "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", sync._REMOTE_HASHES, "~/w"], input=b'["d/f", "new/g"]',
                         capture_output=True, env=env, check=True)
    answer = json.loads(out.stdout)
    assert answer["root"] == str(tmp_path / "w")
    assert answer["files"]["d/f"] == [sync.file_digest(tmp_path / "w" / "d" / "f"), False]
    assert answer["files"]["new/g"] is None and (tmp_path / "w" / "new").is_dir()  # parent made for upload


def test_package_files_lists_python_sources(tmp_path: Path) -> None:
    files = sync.package_files(REPO / "distributed", "distributed")
    assert files["distributed/probe.py"] == REPO / "distributed" / "probe.py"
    assert "distributed/__init__.py" in files
    assert all(k.endswith(".py") and "__pycache__" not in k for k in files)
    with pytest.raises(ValueError, match="inside the work dir"):
        sync.sync_files(None, {"../escape.py": tmp_path}, "~/x")  # type: ignore[arg-type]
