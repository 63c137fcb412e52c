"""Fixtures for tests that talk to a real sshd on loopback: a client key, the server, an isolated HOME."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.sshd import SshdHandle, make_client_key, make_ssh_home, start_sshd


@pytest.fixture(scope="module")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(private key path, public key line), accepted by `server`."""
    return make_client_key(tmp_path_factory.mktemp("client"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, client_key: tuple[Path, str]) -> Iterator[SshdHandle]:
    """One real sshd on 127.0.0.1 for the whole module."""
    handle = start_sshd(tmp_path_factory.mktemp("sshd"), authorized_keys=[client_key[1]])
    yield handle
    handle.stop()


def isolate_home(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """Point HOME at `home` and drop the agent: only the keys the test put there count."""
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


@pytest.fixture
def ssh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: SshdHandle,
             client_key: tuple[Path, str]) -> Path:
    """An isolated HOME holding the client key and the server's key in known_hosts (never the real ~/.ssh)."""
    home = make_ssh_home(tmp_path / "home", client_key[0], [server.known_hosts_line()])
    isolate_home(monkeypatch, home)
    return home
