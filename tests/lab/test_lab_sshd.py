"""Self-test of tests/support/sshd.py: a real sshd on loopback answers a command over paramiko."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import paramiko
import pytest

from tests.lab.labnet import wait_until
from tests.support.sshd import SSHD, descendants, make_client_key, make_ssh_home, start_sshd

pytestmark = [
    pytest.mark.skipif(not Path(SSHD).exists() or shutil.which("ssh-keygen") is None,
                       reason="needs openssh-server and ssh-keygen"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the test sshd runs as root (it logs in as root)"),
]


def test_sshd_on_loopback_runs_a_command_and_verifies_its_host_key(tmp_path: Path) -> None:
    key_path, public = make_client_key(tmp_path / "client")
    handle = start_sshd(tmp_path / "sshd", authorized_keys=[public])
    try:
        assert handle.host == "127.0.0.1" and handle.port > 0
        assert handle.known_hosts_line().startswith(f"[127.0.0.1]:{handle.port} ssh-ed25519 AAAA")
        home = make_ssh_home(tmp_path / "home", key_path, [handle.known_hosts_line()])
        assert (home / ".ssh").stat().st_mode & 0o777 == 0o700
        assert (home / ".ssh" / "id_ed25519").stat().st_mode & 0o777 == 0o600

        client = paramiko.SSHClient()
        client.load_host_keys(str(home / ".ssh" / "known_hosts"))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())  # an unknown key must fail
        sock = socket.create_connection((handle.host, handle.port), timeout=5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.connect(handle.host, handle.port, username="root", sock=sock,
                       key_filename=str(home / ".ssh" / "id_ed25519"), look_for_keys=False,
                       allow_agent=False, timeout=5)
        try:
            _, stdout, _ = client.exec_command("echo hi")
            assert stdout.read() == b"hi\n"
            assert stdout.channel.recv_exit_status() == 0
            client.exec_command("exec sleep 61")  # a session still running when the server stops
            wait_until(lambda: _sleepers(handle.process.pid) != [], 5, "the session's sleep to start")
            [sleeper] = _sleepers(handle.process.pid)
            handle.stop()
            wait_until(lambda: not _alive(sleeper), 5, "stop() to end the session's processes too")
        finally:
            client.close()
    finally:
        handle.stop()
    assert handle.process.poll() is not None
    with pytest.raises(OSError):
        socket.create_connection((handle.host, handle.port), timeout=1).close()


def test_a_key_not_in_authorized_keys_is_refused(tmp_path: Path) -> None:
    _, public = make_client_key(tmp_path / "allowed")
    other_key, _ = make_client_key(tmp_path / "other")
    handle = start_sshd(tmp_path / "sshd", authorized_keys=[public])
    try:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        with pytest.raises(paramiko.AuthenticationException):
            client.connect(handle.host, handle.port, username="root", key_filename=str(other_key),
                           look_for_keys=False, allow_agent=False, timeout=5)
        client.close()
    finally:
        handle.stop()


def _sleepers(pid: int) -> list[int]:
    found = []
    for child in descendants(pid):
        try:
            if Path(f"/proc/{child}/cmdline").read_bytes() == b"sleep\x0061\x00":
                found.append(child)
        except OSError:  # exited meanwhile
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
