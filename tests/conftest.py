"""Shared pytest setup: markers by directory, the session-wide emulated lab, an isolated HOME."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.labnet import Lab, LabUnavailable, session_prefix

TESTS = Path(__file__).resolve().parent
# Needs only a local sshd, not the namespaces: runs with the integration tests.
NOT_LAB = {TESTS / "lab" / "test_lab_sshd.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by directory: tests/lab -> lab, tests/integration -> integration."""
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if path in NOT_LAB:
            item.add_marker(pytest.mark.integration)
        elif (TESTS / "lab") in path.parents:
            item.add_marker(pytest.mark.lab)
        elif (TESTS / "integration") in path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Three emulated hosts (tests/lab/labnet.py) for the whole session, mDNS announcers included.

    Its prefix is this process's own (`session_prefix()`), so pytest runs in parallel get separate labs.
    Skips with one line when this machine cannot host it (not root, ip/tc/sshd missing, no namespaces);
    under CI (CI=true), which installs what the lab needs, that is a failure instead: a green CI must mean
    the lab ran.
    """
    try:
        Lab.cleanup_dead_sessions()
        lab = Lab.up(3, prefix=session_prefix(), state_dir=tmp_path_factory.mktemp("lab"), announce_mdns=True)
    except LabUnavailable as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"lab unavailable under CI: {exc}")
        pytest.skip(f"lab unavailable: {exc}")
    try:
        yield lab
    finally:
        lab.down()


@pytest.fixture
def tmp_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point HOME at an empty temp dir (and hide the ssh agent) so a test never touches the real home."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(var, raising=False)
    return home
