"""launcher.transport.ssh against a real OpenSSH server on 127.0.0.1, with HOME isolated (never the real ~/.ssh)."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from distributed.errors import ConfigError, HostError
from launcher.room.hosts import HostSpec
from launcher.transport import ssh
from tests.integration.conftest import isolate_home
from tests.support.sshd import SshdHandle, make_client_key, make_ssh_home, requires_openssh, start_sshd

pytestmark = [
    pytest.mark.integration,
    requires_openssh,
]


@pytest.fixture
def home(ssh_home: Path) -> Path:
    return ssh_home


@pytest.fixture
def spec(server: SshdHandle) -> HostSpec:
    return HostSpec(name="loop", hostname=server.host, port=server.port)


def keygen_fingerprint(pub_line: str, tmp: Path) -> str:
    """The SHA256 fingerprint as `ssh-keygen -lf` prints it (second field)."""
    path = tmp / "k.pub"
    path.write_text(pub_line + "\n")
    out = subprocess.run(["ssh-keygen", "-lf", str(path)], capture_output=True, text=True, check=True)
    return out.stdout.split()[1]


def accepted_logins(server: SshdHandle) -> int:
    return server.log_path.read_text(errors="replace").count("Accepted publickey")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- commands --------------------------------------------------------------------------------

def test_run_returns_output_and_exit_codes(home: Path, spec: HostSpec) -> None:
    with ssh.connect(spec) as conn:
        ok = conn.run("echo hello; echo oops >&2")
        assert (ok.rc, ok.stdout, ok.stderr) == (0, "hello\n", "oops\n")
        assert conn.run("exit 7").rc == 7
        assert conn.run("false").rc == 1
        assert conn.local_addr == "127.0.0.1" and conn.peer_addr == "127.0.0.1"


def test_run_passes_stdin_and_env(home: Path, spec: HostSpec) -> None:
    payload = os.urandom(300_000)  # larger than the channel window: needs the concurrent writer
    with ssh.connect(spec) as conn:
        result = conn.run("sha256sum", stdin=payload)
        assert result.stdout.split()[0] == hashlib.sha256(payload).hexdigest()
        quoted = conn.run('printf %s "$MACRUN_X"', env={"MACRUN_X": "a b'c $HOME"})
        assert quoted.stdout == "a b'c $HOME"


def test_run_times_out(home: Path, spec: HostSpec) -> None:
    with ssh.connect(spec) as conn:
        started = time.monotonic()
        with pytest.raises(HostError, match="did not finish within 0.5 s"):
            conn.run("sleep 5", timeout=0.5)
        assert time.monotonic() - started < 3.0
        assert conn.run("echo still usable").stdout == "still usable\n"


def test_start_streams_lines_before_exit(home: Path, spec: HostSpec) -> None:
    with ssh.connect(spec) as conn:
        proc = conn.start("echo first; echo to-stderr >&2; read line; echo got-$line; exit 3")
        lines: list[bytes] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout))
        reader.start()
        # The first line must arrive while the process still waits for stdin: streaming, not buffering.
        assert proc.stdout is not None
        deadline = time.monotonic() + 10
        while not lines and time.monotonic() < deadline:
            reader.join(0.01)
        assert lines[:1] == [b"first\n"]
        assert proc.poll() is None and not proc.is_lost()
        assert proc.stderr.readline() == b"to-stderr\n"
        proc.write_stdin(b"go\n")
        assert proc.wait(10) == 3
        reader.join(10)
        assert lines == [b"first\n", b"got-go\n"]
        assert proc.signal is None and not proc.is_lost()
        proc.close()


def test_start_reports_death_by_signal(home: Path, spec: HostSpec) -> None:
    with ssh.connect(spec) as conn:
        proc = conn.start("kill -TERM $$")
        assert proc.wait(10) == 128 + 15
        assert proc.signal == "TERM" and not proc.is_lost()


def test_lost_connection_is_reported_as_lost(home: Path, spec: HostSpec) -> None:
    conn = ssh.connect(spec)
    proc = conn.start("echo $$; exec sleep 30")
    pid = int(proc.stdout.readline())
    try:
        # Kill this connection's sshd session process: the transport dies under the running command.
        with pytest.raises(HostError):
            conn.run("kill -9 $PPID", timeout=10)
        assert proc.wait(10) is None
        assert proc.is_lost()
        assert not conn.is_alive()
    finally:
        conn.close()
        try:
            os.kill(pid, 9)  # the orphaned `sleep` this test started (loopback: same machine)
        except ProcessLookupError:
            pass


def test_tcp_nodelay_is_set(home: Path, spec: HostSpec) -> None:
    with ssh.connect(spec) as conn:
        assert conn.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


# ---- host keys -------------------------------------------------------------------------------

def test_unknown_host_key_is_refused_with_its_fingerprint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           server: SshdHandle, spec: HostSpec,
                                                           client_key: tuple[Path, str]) -> None:
    isolate_home(monkeypatch, make_ssh_home(tmp_path / "h", client_key[0], []))
    before = accepted_logins(server)
    with pytest.raises(HostError) as err:
        ssh.connect(spec)
    expected = keygen_fingerprint(server.host_key_pub, tmp_path)
    assert expected in err.value.message and "ED25519" in err.value.message
    assert "loop" in err.value.message and f"{server.host}:{server.port}" in err.value.message
    assert "macrun hosts trust loop" in (err.value.hint or "")
    assert f"ssh-keyscan -p {server.port} {server.host}" in (err.value.hint or "")
    assert accepted_logins(server) == before  # refused before logging in: nothing could have started


def test_accept_new_host_key_records_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        server: SshdHandle, spec: HostSpec,
                                        client_key: tuple[Path, str]) -> None:
    h = make_ssh_home(tmp_path / "h", client_key[0], [])
    isolate_home(monkeypatch, h)
    with ssh.connect(spec, accept_new_host_key=True) as conn:
        assert conn.run("echo ok").stdout == "ok\n"
    assert server.known_hosts_line() in (h / ".ssh" / "known_hosts").read_text()
    with ssh.connect(spec) as conn:  # now known: no flag needed
        assert conn.run("true").rc == 0


def test_trust_host_key_then_connect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: SshdHandle,
                                     spec: HostSpec, client_key: tuple[Path, str]) -> None:
    h = make_ssh_home(tmp_path / "h", client_key[0], [])
    isolate_home(monkeypatch, h)
    assert ssh.trust_host_key(spec) == keygen_fingerprint(server.host_key_pub, tmp_path)
    assert ssh.trust_host_key(spec) == keygen_fingerprint(server.host_key_pub, tmp_path)
    lines = (h / ".ssh" / "known_hosts").read_text().splitlines()
    assert lines == [server.known_hosts_line()]  # trusted once, not appended twice
    with ssh.connect(spec) as conn:
        assert conn.run("true").rc == 0


def test_changed_host_key_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: SshdHandle,
                                     spec: HostSpec, client_key: tuple[Path, str]) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    other_pub = " ".join((tmp_path / "other.pub").read_text().split()[:2])
    name = f"[{server.host}]:{server.port}"
    isolate_home(monkeypatch, make_ssh_home(tmp_path / "h", client_key[0], [f"{name} {other_pub}"]))
    with pytest.raises(HostError, match="CHANGED") as err:
        ssh.connect(spec, accept_new_host_key=True)  # even accept-new never overrides a changed key
    assert keygen_fingerprint(other_pub, tmp_path) in err.value.message
    assert keygen_fingerprint(server.host_key_pub, tmp_path) in err.value.message
    assert f"ssh-keygen -R '{name}'" in (err.value.hint or "")
    with pytest.raises(HostError, match="CHANGED"):
        ssh.trust_host_key(spec)


def test_hashed_known_hosts_entry_is_accepted(home: Path, spec: HostSpec) -> None:
    known = home / ".ssh" / "known_hosts"
    subprocess.run(["ssh-keygen", "-H", "-f", str(known)], check=True, capture_output=True)
    assert known.read_text().startswith("|1|")
    with ssh.connect(spec) as conn:
        assert conn.run("true").rc == 0


def test_revoked_host_key_is_refused_naming_file_and_line(home: Path, spec: HostSpec, server: SshdHandle) -> None:
    known = home / ".ssh" / "known_hosts"
    known.write_text(f"# keys of machines given away\n@revoked * {server.host_key_pub}\n{server.known_hosts_line()}\n")
    before = accepted_logins(server)
    for attempt in (lambda: ssh.connect(spec), lambda: ssh.connect(spec, accept_new_host_key=True),
                    lambda: ssh.trust_host_key(spec)):
        with pytest.raises(HostError, match="REVOKED") as err:
            attempt()
        assert f"{known} line 2" in err.value.message and "loop" in err.value.message
    assert accepted_logins(server) == before  # refused before logging in
    assert known.read_text().count(server.host_key_pub) == 2  # nothing was added


def test_cert_authority_line_is_skipped_with_one_note(home: Path, spec: HostSpec, server: SshdHandle,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    # paramiko's own reader raised on this line, so every connection failed.
    known = home / ".ssh" / "known_hosts"
    ca_pub = server.host_key_pub  # any key: the line is never used, only read past
    known.write_text(f"@cert-authority *.example.com {ca_pub}\nthis line is garbage\n{server.known_hosts_line()}\n")
    caplog.set_level(logging.WARNING, logger="macrun.known_hosts")
    for _ in range(2):
        with ssh.connect(spec) as conn:
            assert conn.run("true").rc == 0
    notes = [r.getMessage() for r in caplog.records if r.name == "macrun.known_hosts"]
    assert notes == [f"note: {known} line 1: @cert-authority lines (host certificates) are not supported by "
                     "macrun; skipped", f"note: {known} line 2: the key is not valid base64 SSH key data; line skipped"]


def test_bad_env_name_is_refused_before_anything_runs(home: Path, spec: HostSpec, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with ssh.connect(spec) as conn:
        with pytest.raises(ConfigError, match=r"'X;touch"):
            conn.run("true", env={f"X;touch {marker};Y": "1"})
        assert conn.run("true", env={"OK_NAME": "$(touch " + str(marker) + ")"}).rc == 0  # values stay data
    assert not marker.exists()


# ---- failures to reach or log in --------------------------------------------------------------

def test_connection_refused_names_host_and_port(home: Path) -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(HostError, match=f"127.0.0.1:{port}.*connection refused"):
        ssh.connect(HostSpec(name="nobody", hostname="127.0.0.1", port=port), timeout=10)
    assert time.monotonic() - started < 10


def test_silent_server_fails_within_timeout(home: Path) -> None:
    with socket.socket() as listener:  # accepts TCP (kernel backlog) but never says the SSH banner
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(HostError, match=f"mute.*127.0.0.1:{port}"):
            ssh.connect(HostSpec(name="mute", hostname="127.0.0.1", port=port), timeout=1.0)
        assert time.monotonic() - started < 5


def test_unresolvable_name_is_said_in_words(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real lookup would query the network's resolver; the tests only ever talk to loopback.
    def no_such_name(*args: object, **kwargs: object) -> socket.socket:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(ssh.socket, "create_connection", no_such_name)
    with pytest.raises(HostError, match=r"cannot reach x \(studio.local:22\): name not resolved"):
        ssh.connect(HostSpec(name="x", hostname="studio.local", port=22), timeout=5)


def test_bad_key_file_is_named(home: Path, spec: HostSpec, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage_key"
    garbage.write_text("this is not a key\n")
    with pytest.raises(HostError, match=f"key file {garbage}") as err:
        ssh.connect(HostSpec(name="loop", hostname=spec.hostname, port=spec.port, key_file=str(garbage)))
    assert "root@" in err.value.message or "@127.0.0.1" in err.value.message
    missing = tmp_path / "missing_key"
    with pytest.raises(HostError, match=f"{missing}.*no such file"):
        ssh.connect(HostSpec(name="loop", hostname=spec.hostname, port=spec.port, key_file=str(missing)))


def test_encrypted_key_file_without_agent_says_so(home: Path, spec: HostSpec, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(locked)], check=True)
    (home / ".ssh" / "id_ed25519").unlink()  # nothing else to fall back on
    with pytest.raises(HostError, match=f"{locked} \\(encrypted: add it to the ssh-agent") as err:
        ssh.connect(HostSpec(name="loop", hostname=spec.hostname, port=spec.port, key_file=str(locked)))
    assert f"ssh-add {locked}" in err.value.message


def test_rejected_key_names_user_host_and_keys_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     server: SshdHandle, spec: HostSpec) -> None:
    stranger, _ = make_client_key(tmp_path / "stranger")
    isolate_home(monkeypatch, make_ssh_home(tmp_path / "h", stranger, [server.known_hosts_line()]))
    with pytest.raises(HostError, match="no key was accepted") as err:
        ssh.connect(HostSpec(name="loop", hostname=spec.hostname, port=spec.port, user="root"))
    assert f"root@{server.host}:{server.port}" in err.value.message
    assert str(tmp_path / "h" / ".ssh" / "id_ed25519") in err.value.message
    assert "ssh-copy-id" in (err.value.hint or "")


def test_ssh_config_alias_resolves(home: Path, server: SshdHandle) -> None:
    ssh_dir = home / ".ssh"
    (ssh_dir / "id_ed25519").rename(ssh_dir / "lab_key")  # only reachable through IdentityFile
    (ssh_dir / "config").write_text(
        f"Host labbox\n  HostName {server.host}\n  Port 1\n  User root\n  IdentityFile ~/.ssh/lab_key\n")
    with pytest.raises(HostError, match="connection refused"):  # config Port 1 used when spec has none
        ssh.connect(HostSpec(name="box", hostname="labbox"), timeout=5)
    with ssh.connect(HostSpec(name="box", hostname="labbox", port=server.port)) as conn:  # spec wins
        assert conn.target.hostname == server.host and conn.target.user == "root"
        assert conn.run("echo via-alias").stdout == "via-alias\n"


def test_connect_all_closes_the_good_ones_when_one_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         client_key: tuple[Path, str]) -> None:
    own = start_sshd(tmp_path / "sshd", authorized_keys=[client_key[1]])  # its own: count its connections
    try:
        isolate_home(monkeypatch, make_ssh_home(tmp_path / "h", client_key[0], [own.known_hosts_line()]))
        good = [HostSpec(name=f"good{i}", hostname=own.host, port=own.port) for i in range(2)]
        conns = ssh.connect_all(good)
        assert [c.host.name for c in conns] == ["good0", "good1"]
        assert established_to(own.port) == 2
        for c in conns:
            c.close()
        bad = HostSpec(name="bad", hostname="127.0.0.1", port=free_port())
        with pytest.raises(HostError) as err:
            ssh.connect_all([*good, bad])
        # One failed host: its own one-line error, naming it (not the good ones).
        assert "\n" not in err.value.message and "good" not in err.value.message
        assert err.value.message.startswith("cannot reach bad (127.0.0.1:")
        bad2 = HostSpec(name="bad2", hostname="127.0.0.1", port=free_port())
        with pytest.raises(HostError) as err:
            ssh.connect_all([*good, bad, bad2])
        first_line = err.value.message.splitlines()[0]
        assert "2 of 4" in first_line and "bad, bad2" in first_line and "good" not in first_line
        assert "bad: cannot reach bad (127.0.0.1:" in err.value.message
        deadline = time.monotonic() + 5
        while established_to(own.port) and time.monotonic() < deadline:
            time.sleep(0.01)  # polling interval while the kernel finishes the close
        assert established_to(own.port) == 0
    finally:
        own.stop()


def established_to(port: int) -> int:
    """Client-side ESTABLISHED TCP connections to 127.0.0.1:port, from /proc/net/tcp."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        if remote_port == port and fields[3] == "01":
            count += 1
    return count
