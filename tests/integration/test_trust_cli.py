"""`macrun hosts trust` against a real sshd: it shows the fingerprint and asks before adding the key.

The non-interactive cases run the real app in process (CliRunner, whose stdin is never a terminal); the
questions are answered on a real pseudo-terminal by driving the console script with pexpect.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pexpect
import pytest
from typer.testing import CliRunner, Result

from launcher.cli import app
from tests.integration.conftest import isolate_home
from tests.lab.scripts.macrun_proc import MACRUN, cli_env
from tests.support.sshd import SshdHandle, make_ssh_home, requires_openssh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120), requires_openssh]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_key: tuple[Path, str]) -> Path:
    """An isolated HOME whose known_hosts is empty."""
    h = make_ssh_home(tmp_path / "home", client_key[0], [])
    isolate_home(monkeypatch, h)
    monkeypatch.delenv("MACRUN_DEBUG", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    return h


@pytest.fixture
def hosts(tmp_path: Path, server: SshdHandle) -> Path:
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({"hosts": [{"name": "loop", "host": server.host, "port": server.port,
                                           "user": "root"}]}))
    return path


def fingerprint(server: SshdHandle, tmp_path: Path) -> str:
    (tmp_path / "host.pub").write_text(server.host_key_pub + "\n")
    out = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "host.pub")], capture_output=True, text=True)
    return out.stdout.split()[1]


def trust(hosts: Path, *extra: str) -> Result:
    return CliRunner().invoke(app, ["hosts", "trust", "loop", "--hosts", str(hosts), *extra], input="y\n")


def known(home: Path) -> str:
    return (home / ".ssh" / "known_hosts").read_text()


def test_without_a_terminal_it_shows_the_key_and_refuses(home: Path, hosts: Path, server: SshdHandle,
                                                         tmp_path: Path) -> None:
    result = trust(hosts)  # an answer is piped in, but a pipe is not a person who compared fingerprints
    assert result.exit_code == 2, result.output
    assert f"offers the host key ED25519 {fingerprint(server, tmp_path)}" in result.stdout
    assert "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub" in result.stdout
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "error: not trusting loop: stdin is not a terminal, so macrun cannot ask you"
    assert lines[1].startswith("hint: ") and "macrun hosts trust loop --yes" in lines[1] and len(lines) == 2
    assert known(home) == ""


def test_yes_adds_the_key_once(home: Path, hosts: Path, server: SshdHandle, tmp_path: Path) -> None:
    result = trust(hosts, "--yes")
    assert result.exit_code == 0, result.output
    assert f"trusted loop: ED25519 {fingerprint(server, tmp_path)}" in result.stdout
    assert known(home).splitlines() == [server.known_hosts_line()]
    again = trust(hosts)  # already on file: nothing to ask, nothing to add
    assert again.exit_code == 0 and "loop" in again.stdout and "already trusted" in again.stdout
    assert known(home).splitlines() == [server.known_hosts_line()]


def test_changed_and_revoked_keys_are_errors_not_questions(home: Path, hosts: Path, server: SshdHandle,
                                                           tmp_path: Path) -> None:
    ssh_dir = home / ".ssh"
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    name = f"[{server.host}]:{server.port}"
    (ssh_dir / "known_hosts").write_text(f"{name} {' '.join(other.with_suffix('.pub').read_text().split()[:2])}\n")
    changed = trust(hosts, "--yes")
    assert changed.exit_code == 3 and "error: the host key of loop" in changed.stderr and "CHANGED" in changed.stderr
    (ssh_dir / "known_hosts").write_text(f"@revoked * {server.host_key_pub}\n")
    revoked = trust(hosts, "--yes")
    assert revoked.exit_code == 3 and "REVOKED" in revoked.stderr and "Traceback" not in revoked.output
    assert known(home) == f"@revoked * {server.host_key_pub}\n"


def test_cert_authority_line_no_longer_breaks_trust(home: Path, hosts: Path, server: SshdHandle) -> None:
    (home / ".ssh" / "known_hosts").write_text(f"@cert-authority *.example.com {server.host_key_pub}\n")
    result = trust(hosts, "--yes")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert known(home).splitlines()[1] == server.known_hosts_line()


@pytest.mark.parametrize("answer,code", [("y", 0), ("n", 1)])
def test_on_a_terminal_it_asks(home: Path, hosts: Path, server: SshdHandle, tmp_path: Path,
                               answer: str, code: int) -> None:
    (home / ".ssh" / "known_hosts").write_text(f"@cert-authority *.example.com {server.host_key_pub}\n")
    child = pexpect.spawn(MACRUN, ["hosts", "trust", "loop", "--hosts", str(hosts)], env=cli_env(home),
                          cwd=str(tmp_path), encoding="utf-8", timeout=60)
    try:
        child.expect("note: .*known_hosts line 1: @cert-authority lines")  # one line, no traceback
        child.expect_exact(f"offers the host key ED25519 {fingerprint(server, tmp_path)}")  # + and / are literal
        child.expect(r"Trust loop's key\? \[y/N\]")
        child.sendline(answer)
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == code, child.before
    lines = known(home).splitlines()
    assert lines[1:] == ([server.known_hosts_line()] if answer == "y" else [])
    assert ("trusted loop: ED25519" in (child.before or "")) is (answer == "y")
