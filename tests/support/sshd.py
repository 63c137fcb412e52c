"""Start a real OpenSSH server for tests, on loopback or inside a network namespace."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

SSHD = "/usr/sbin/sshd"
# Tests that start an sshd carry this marker: they skip, with one line, where OpenSSH is not installed.
requires_openssh = pytest.mark.skipif(shutil.which("ssh-keygen") is None or not Path(SSHD).exists(),
                                      reason="needs OpenSSH (sshd, ssh-keygen)")
READY_DEADLINE_S = 10.0
_CLONE_NEWNET = 0x40000000
T = TypeVar("T")


class SshdStartError(RuntimeError):
    """sshd did not come up; the message carries the tail of its log."""


def make_client_key(dir: Path) -> tuple[Path, str]:
    """Create (or reuse) an ed25519 key without passphrase in `dir`; return its path and public line."""
    dir.mkdir(parents=True, exist_ok=True)
    key = dir / "id_ed25519"
    if not key.exists():
        _keygen(key, comment="macrun-test-client")
    return key, _public_line(key)


def make_ssh_home(home: Path, key_path: Path, known_hosts_lines: Sequence[str]) -> Path:
    """Build an isolated HOME with `.ssh/id_ed25519` and `known_hosts`, so tests never touch ~/.ssh."""
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    ssh_dir.chmod(0o700)
    private = ssh_dir / "id_ed25519"
    shutil.copyfile(key_path, private)
    private.chmod(0o600)
    public = key_path.with_name(key_path.name + ".pub")
    if public.exists():
        shutil.copyfile(public, ssh_dir / "id_ed25519.pub")
        (ssh_dir / "id_ed25519.pub").chmod(0o644)
    known = ssh_dir / "known_hosts"
    known.write_text("".join(line.rstrip("\n") + "\n" for line in known_hosts_lines))
    known.chmod(0o600)
    return home


@dataclass
class SshdHandle:
    """A running sshd: where it listens, its host key, its log, and how to stop it."""

    host: str
    port: int
    host_key_pub: str  # "ssh-ed25519 AAAA..." (no comment)
    log_path: Path
    process: subprocess.Popen[bytes]
    netns: str | None = None
    state_dir: Path | None = None
    _stopped: bool = field(default=False, repr=False)

    def known_hosts_line(self, host: str | None = None) -> str:
        """The known_hosts line for this server, under `host` (default: the address it listens on)."""
        name = host or self.host
        prefix = name if self.port == 22 else f"[{name}]:{self.port}"
        return f"{prefix} {self.host_key_pub}"

    def log_tail(self, lines: int = 20) -> str:
        """The last `lines` lines of the sshd log (empty when there is none)."""
        return _tail(self.log_path, lines)

    def stop(self) -> None:
        """Stop the server and every session process it forked. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        victims = [self.process.pid, *descendants(self.process.pid)]
        for pid in victims:
            _signal(pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _signal(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)
        for pid in victims[1:]:
            _signal(pid, signal.SIGKILL)


def start_sshd(
    state_dir: Path,
    *,
    listen: str = "127.0.0.1",
    port: int = 0,
    netns: str | None = None,
    authorized_keys: Sequence[str],
    home: Path | None = None,
    keep_paths: Sequence[str] = (),
    probe_host: str | None = None,
    hostname: str | None = None,
) -> SshdHandle:
    """Start sshd in the foreground (`-D`) with its own host key and config under `state_dir`.

    `port=0` picks a free port (on loopback, or in `netns` when given). With `home` (netns only), the
    server runs in its own mount namespace where root's home directory is `home`; `keep_paths` (absolute
    paths under the real home, e.g. a pyenv tree) are bound back into it so interpreters keep working;
    `hostname` (with `home`) gives it its own UTS namespace with that host name.
    Readiness is a TCP connect to `probe_host or listen` (inside `netns`), polled for 10 s.
    """
    if not Path(SSHD).exists():
        raise SshdStartError(f"{SSHD} not found (install openssh-server)")
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
    host_key = state_dir / "ssh_host_ed25519_key"
    if not host_key.exists():
        _keygen(host_key, comment="macrun-test-host")
    auth_file = state_dir / "authorized_keys"
    auth_file.write_text("".join(k.rstrip("\n") + "\n" for k in authorized_keys))
    auth_file.chmod(0o600)
    log_path = state_dir / "sshd.log"
    probe = probe_host or ("127.0.0.1" if listen in ("0.0.0.0", "") else listen)

    attempts = 3 if port == 0 else 1
    last_error: SshdStartError | None = None
    for _ in range(attempts):
        chosen = port or _free_port(probe if netns is None else "127.0.0.1", netns)
        config = state_dir / "sshd_config"
        config.write_text(_config_text(listen, chosen, host_key, auth_file, state_dir))
        argv = [SSHD, "-D", "-f", str(config), "-E", str(log_path)]
        if home is not None:
            if netns is None:
                raise ValueError("home= needs netns= (it uses a private mount namespace)")
            argv = _with_private_home(argv, home, keep_paths, hostname)
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        handle = SshdHandle(
            host=probe if listen in ("0.0.0.0", "") else listen, port=chosen,
            host_key_pub=_public_line(host_key, strip_comment=True), log_path=log_path, process=process,
            netns=netns, state_dir=state_dir,
        )
        try:
            _wait_ready(handle, probe, chosen, netns)
            return handle
        except SshdStartError as exc:
            handle.stop()
            last_error = exc
            if "Address already in use" not in handle.log_tail():
                break
    assert last_error is not None
    raise last_error


def _config_text(listen: str, port: int, host_key: Path, auth_file: Path, state_dir: Path) -> str:
    # StrictModes off: test state lives under /tmp, whose modes sshd would otherwise refuse.
    return "\n".join([
        f"Port {port}",
        f"ListenAddress {listen or '0.0.0.0'}",
        f"HostKey {host_key}",
        f"PidFile {state_dir / 'sshd.pid'}",
        f"AuthorizedKeysFile {auth_file}",
        "UsePAM no",
        "StrictModes no",
        "PermitRootLogin yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "UseDNS no",
        "PrintMotd no",
        "X11Forwarding no",
        "AllowTcpForwarding yes",
        "MaxStartups 64",
        "MaxSessions 64",
        "Subsystem sftp internal-sftp",
        "LogLevel VERBOSE",
        "",
    ])


def _with_private_home(argv: list[str], home: Path, keep_paths: Sequence[str], hostname: str | None
                       ) -> list[str]:
    """Wrap argv so it runs in a private mount namespace where the real home is replaced by `home`."""
    real_home = Path(os.path.expanduser("~root"))
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    lines = ["set -e"]
    for keep in keep_paths:
        rel = Path(keep).resolve().relative_to(real_home)
        target = home / rel
        lines.append(f"mkdir -p '{target}' && mount --bind '{real_home / rel}' '{target}'")
    lines.append(f"mount --rbind '{home}' '{real_home}'")
    if hostname:
        lines.append(f"hostname '{hostname}'")
    lines.append('exec "$@"')
    uts = ["--uts"] if hostname else []
    return ["unshare", "--mount", *uts, "--propagation", "private", "sh", "-c", "\n".join(lines), "sh", *argv]


def _wait_ready(handle: SshdHandle, host: str, port: int, netns: str | None) -> None:
    deadline = time.monotonic() + READY_DEADLINE_S
    while time.monotonic() < deadline:
        if handle.process.poll() is not None:
            raise SshdStartError(
                f"sshd exited with code {handle.process.returncode} before listening on {host}:{port}; "
                f"log tail:\n{handle.log_tail()}"
            )
        if _can_connect(host, port, netns):
            return
        time.sleep(0.02)  # polling interval of a deadline loop, not synchronisation
    raise SshdStartError(f"sshd did not accept on {host}:{port} within {READY_DEADLINE_S:.0f} s; "
                         f"log tail:\n{handle.log_tail()}")


def _can_connect(host: str, port: int, netns: str | None) -> bool:
    def attempt() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    return run_in_netns(netns, attempt) if netns else attempt()


def _free_port(host: str, netns: str | None) -> int:
    def pick() -> int:
        with socket.socket() as s:
            s.bind((host, 0))
            return int(s.getsockname()[1])

    return run_in_netns(netns, pick) if netns else pick()


def run_in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run `fn` on a short-lived thread that has joined network namespace `netns` (setns is per thread)."""
    result: list[T] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns({netns}) failed")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def _keygen(path: Path, *, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True, stdin=subprocess.DEVNULL, capture_output=True,
    )
    path.chmod(0o600)


def _public_line(key: Path, *, strip_comment: bool = False) -> str:
    line = key.with_name(key.name + ".pub").read_text().strip()
    return " ".join(line.split()[:2]) if strip_comment else line


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid`, found by walking /proc (sshd's session children call setsid; rank shims
    start new sessions too)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
