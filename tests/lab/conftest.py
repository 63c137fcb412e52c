"""Fixtures for lab tests: the master's isolated HOME, a hosts file, and clean hosts between tests."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.labnet import Lab


@pytest.fixture
def lab_home(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME -> the lab's isolated ssh home (the lab's key, known_hosts for every host); no ssh agent."""
    monkeypatch.setenv("HOME", str(lab.ssh_home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return lab.ssh_home


@pytest.fixture
def lab_env(lab: Lab) -> dict[str, str]:
    """An environment for a subprocess on the master (e.g. the macrun CLI) that uses the lab's ssh home."""
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    env["HOME"] = str(lab.ssh_home)
    return env


@pytest.fixture
def lab_hosts_file(lab: Lab, tmp_path: Path) -> Path:
    """hosts.json listing every lab host with one slot."""
    return lab.write_hosts_file(tmp_path / "hosts.json")


@pytest.fixture(autouse=True)
def _reap_lab_strays(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that used the lab, kill whatever it left on the hosts, so the next test starts clean.

    Tests that must prove nothing was left behind assert `lab.stray_pids(host) == []` themselves first.
    """
    yield
    if "lab" not in request.fixturenames:
        return
    lab: Lab = request.getfixturevalue("lab")
    for host in lab.hosts:
        for pid in lab.stray_pids(host):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
