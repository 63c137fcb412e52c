"""launcher.jobs.fetch over a real sshd on loopback: only plain files and folders come back, never through links."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.jobs.fetch import CheckpointFetcher, fetch_tree
from launcher.room.hosts import HostSpec
from launcher.transport import ssh
from tests.support.sshd import SshdHandle, requires_openssh

pytestmark = [requires_openssh, pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def conn(server: SshdHandle, ssh_home: Path) -> Iterator[ssh.SSHConnection]:
    spec = HostSpec(name="loop", hostname=server.host, port=server.port, python=sys.executable)
    with ssh.connect(spec) as c:
        yield c


def _tree(root: Path) -> dict[str, str]:
    """Every entry under `root`: relative path -> "file" / "dir" / "link"."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            kind = "link" if p.is_symlink() else "dir" if p.is_dir() else "file"
            out[str(p.relative_to(root))] = kind
    return out


def test_links_are_never_followed(conn: ssh.SSHConnection, tmp_path: Path) -> None:
    remote = tmp_path / "remote" / "run"  # loopback: the "remote" folder is visible here too
    (remote / "sub").mkdir(parents=True)
    (remote / "metrics.jsonl").write_text('{"step": 1}\n')
    (remote / "sub" / "model.safetensors").write_bytes(b"\x00" * 5000)
    outside = tmp_path / "remote" / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not for the master")
    (remote / "passwd").symlink_to("/etc/passwd")
    (remote / "elsewhere").symlink_to(outside, target_is_directory=True)
    (remote / "sub" / "up").symlink_to("..", target_is_directory=True)  # a loop, if it were followed
    (remote / ".tmp-step_00000009.h.1.ab").mkdir()  # a checkpoint still being written
    (remote / ".tmp-step_00000009.h.1.ab" / "x").write_text("partial")

    local = tmp_path / "local"
    copied = fetch_tree(conn, str(remote), local)
    assert copied == 2
    assert _tree(local) == {"metrics.jsonl": "file", "sub": "dir", "sub/model.safetensors": "file"}
    assert (local / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (local / "sub" / "model.safetensors").stat().st_size == 5000

    assert fetch_tree(conn, str(remote), local) == 0  # same sizes: nothing travels again
    assert fetch_tree(conn, str(remote / "passwd"), tmp_path / "p") == 0  # a link named directly
    assert fetch_tree(conn, str(remote / "elsewhere"), tmp_path / "e") == 0
    assert fetch_tree(conn, str(remote / "missing"), tmp_path / "m") == 0
    assert not (tmp_path / "p").exists() and not (tmp_path / "e").exists() and not (tmp_path / "m").exists()


def test_checkpoint_fetcher_copies_what_rank0_announces(conn: ssh.SSHConnection, tmp_path: Path) -> None:
    job = tmp_path / "job"
    for step in (5, 10, 15):
        folder = job / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(f'{{"step": {step}}}')
        (folder / "model.safetensors").write_bytes(bytes(100 * step))
    (job / "checkpoints" / "step_00000010" / "leak").symlink_to("/etc/passwd")
    run_dir = tmp_path / "run"
    said: list[str] = []
    fetcher = CheckpointFetcher(conn, str(job), run_dir, keep=2, emit=said.append)
    for line in ("[rank 1 loop] checkpoint checkpoints/step_00000005",  # not rank 0: ignored
                 "[rank 0 loop] checkpoint checkpoints/step_00000005",
                 "[rank 0 loop] checkpoint checkpoints/step_00000010",
                 "[rank 0 loop] step 12/20 · loss 2.0",
                 "[rank 0 loop] checkpoint checkpoints/step_00000015",
                 "[rank 0 loop] checkpoint checkpoints/step_00000099"):  # announced, never written: skipped
        fetcher.saw(line)
    fetcher.close(timeout=30)
    assert fetcher.fetched == ["step_00000005", "step_00000010", "step_00000015"]
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000010", "step_00000015"]  # keep=2 pruned 5
    assert _tree(ckpts / "step_00000010") == {"meta.json": "file", "model.safetensors": "file"}
    assert (ckpts / "step_00000015" / "model.safetensors").stat().st_size == 1500
    assert said == []
