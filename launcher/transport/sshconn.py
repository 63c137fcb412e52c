"""A connected host: commands, streamed processes and SFTP over one paramiko transport.

launcher.transport.ssh connects it. A command costs one channel open on the transport (~4 ms on a LAN) rather than a
new handshake.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import paramiko

from distributed.errors import HostError
from launcher.room import known_hosts
from launcher.room.hosts import HostSpec
from launcher.transport.shell import env_exports

KEEPALIVE_S = 15  # lets a dead peer surface as a lost channel instead of a silent hang
SFTP_TIMEOUT_S = 30.0  # an SFTP request with no answer this long fails (socket.timeout, an OSError)
# What an SFTP transfer raises when the host, the link or the remote disk fails (for callers that use sftp()).
TRANSFER_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, paramiko.SSHException, paramiko.SFTPError)
_READ_CHUNK = 65536


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a finished remote command returned; output decoded as UTF-8 (bad bytes replaced)."""

    rc: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


@dataclass(frozen=True, slots=True)
class SSHTarget:
    """Where and as whom to connect, after ~/.ssh/config and the HostSpec are merged."""

    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...]  # from ~/.ssh/config, expanded
    identities_only: bool
    known_hosts_files: tuple[Path, ...]

    @property
    def known_hosts_name(self) -> str:
        """The name OpenSSH files this host's key under: `host`, or `[host]:port` off port 22."""
        return known_hosts.host_name(self.hostname, self.port)

    @property
    def label(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"


class SSHConnection:
    """One authenticated transport to one host; every command and the SFTP session share it."""

    def __init__(self, host: HostSpec, target: SSHTarget, transport: paramiko.Transport,
                 sock: socket.socket) -> None:
        self.host = host
        self.target = target
        self._transport = transport
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.Lock()
        self._home: str | None = None
        self.socket = sock  # for inspection only: the transport owns reads and writes
        self.local_addr: str = sock.getsockname()[0]  # this machine, as seen on the route to the host
        self.peer_addr: str = sock.getpeername()[0]
        transport.set_keepalive(KEEPALIVE_S)

    def __repr__(self) -> str:
        return f"SSHConnection({self.host.name}, {self.target.label})"

    def is_alive(self) -> bool:
        return self._transport.is_active()

    def home(self) -> str:
        """The login user's home folder on the host ($HOME there), asked once per connection."""
        if self._home is None:
            home = self.run('printf %s "$HOME"', timeout=10.0).stdout
            if not home.startswith("/"):
                raise HostError(f"cannot find the home folder of {self.target.label} ({self.host.name}): "
                                f"$HOME is {home!r} there", hint=f"write \"python\" and \"workdir\" for "
                                f"{self.host.name} in hosts.json as absolute paths")
            self._home = home.rstrip("/") or "/"
        return self._home

    def _open_channel(self, cmd: str, env: Mapping[str, str] | None) -> paramiko.Channel:
        # sshd drops most `env` requests (AcceptEnv), so variables travel as shell exports (names checked).
        command = env_exports(env) + cmd
        try:
            chan = self._transport.open_session(timeout=10.0)
            chan.exec_command(command)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise HostError(f"lost the connection to {self.host.name} ({self.target.label}): {exc}",
                            hint="check that the host is still on the network, then retry") from exc
        return chan

    def run(self, cmd: str, *, timeout: float = 30.0, stdin: bytes | None = None,
            env: Mapping[str, str] | None = None) -> CommandResult:
        """Run `cmd` through the login shell and wait for it; HostError if it outlives `timeout`."""
        chan = self._open_channel(cmd, env)
        writer = _feed_stdin(chan, stdin, close=True)
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        try:
            while True:
                if chan.recv_ready():
                    out += chan.recv(_READ_CHUNK)
                elif chan.recv_stderr_ready():
                    err += chan.recv_stderr(_READ_CHUNK)
                elif chan.closed or (chan.eof_received and chan.exit_status_ready()):
                    break
                elif not self._transport.is_active():
                    raise HostError(f"lost the connection to {self.host.name} while running: {cmd[:80]}")
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise HostError(f"command on {self.host.name} did not finish within {timeout:g} s: "
                                        f"{cmd[:80]}", hint="the host may be overloaded or the command hung")
                    if chan.eof_received:  # output is over (the pipe stays readable); await the status
                        chan.status_event.wait(min(left, 1.0))
                    else:
                        select.select([chan], [], [], min(left, 1.0))
            if writer is not None:
                writer.join(timeout=1.0)
            if chan.exit_status < 0:  # closed without a status: the connection (or sshd) went away
                raise HostError(f"lost the connection to {self.host.name} ({self.target.label}) while "
                                f"running: {cmd[:80]}", hint="check that the host is still on the network")
            return CommandResult(chan.exit_status, out.decode(errors="replace"), err.decode(errors="replace"))
        finally:
            chan.close()

    def start(self, cmd: str, *, stdin: bytes | None = None,
              env: Mapping[str, str] | None = None) -> RemoteProcess:
        """Start `cmd` and return at once; stdin stays open unless `stdin` bytes are given (then EOF)."""
        chan = self._open_channel(cmd, env)
        _feed_stdin(chan, stdin, close=True)
        return RemoteProcess(chan, self._transport, self.host.name)

    def sftp(self) -> paramiko.SFTPClient:
        """The connection's SFTP session, opened on first use."""
        with self._lock:
            if self._sftp is None:
                try:
                    self._sftp = paramiko.SFTPClient.from_transport(self._transport)
                except (paramiko.SSHException, EOFError, OSError) as exc:
                    raise HostError(f"cannot open SFTP on {self.host.name} ({self.target.label}): {exc}",
                                    hint="enable the sftp subsystem in the host's sshd_config") from exc
                if self._sftp is None:
                    raise HostError(f"cannot open SFTP on {self.host.name}: the session was refused")
                # A host that drops off the network must surface as an error, not hold a transfer for ever.
                self._sftp.get_channel().settimeout(SFTP_TIMEOUT_S)
            return self._sftp

    def put_file(self, local: Path, remote: str, mode: int | None = None) -> None:
        """Upload `local` to `remote` (`~/` means the remote home) via a temp name and a rename.

        With `mode`, the file has it before its first byte is written, whatever the host's umask.
        """
        sftp = self.sftp()
        remote = remote[2:] if remote.startswith("~/") else remote  # SFTP paths start in the home dir
        tmp = f"{remote}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            with sftp.open(tmp, "wb") as f, open(local, "rb") as src:
                if mode is not None:
                    f.chmod(mode)
                f.set_pipelined(True)
                shutil.copyfileobj(src, f, 32768)  # paramiko's own put() uses the same chunk size
            sftp.posix_rename(tmp, remote)
        except (OSError, paramiko.SSHException) as exc:
            try:
                sftp.remove(tmp)
            except (OSError, paramiko.SSHException):
                pass
            raise HostError(f"cannot upload {local} to {self.host.name}:{remote}: {exc}",
                            hint="check free disk space and permissions on the host") from exc

    def close(self) -> None:
        """Close the SFTP session and the transport (remote processes without a tty are not killed)."""
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        self._transport.close()

    def __enter__(self) -> SSHConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _feed_stdin(chan: paramiko.Channel, data: bytes | None, *, close: bool) -> threading.Thread | None:
    """Send `data` on a thread (a big payload must not block reading the output), then EOF."""
    if data is None:
        return None

    def feed() -> None:
        try:
            chan.sendall(data)
            if close:
                chan.shutdown_write()
        except (OSError, paramiko.SSHException):
            pass  # the command exited without reading; its status tells the story

    thread = threading.Thread(target=feed, name="ssh-stdin", daemon=True)
    thread.start()
    return thread


class RemoteProcess:
    """A command started with `SSHConnection.start`; its output is read by the caller's threads."""

    def __init__(self, chan: paramiko.Channel, transport: paramiko.Transport, host_name: str) -> None:
        self._chan = chan
        self._transport = transport
        self.host_name = host_name
        self.stdout: IO[bytes] = chan.makefile("rb")
        self.stderr: IO[bytes] = chan.makefile_stderr("rb")

    def write_stdin(self, data: bytes) -> None:
        """Send bytes to the process's stdin; HostError if the channel is gone."""
        try:
            self._chan.sendall(data)
        except (OSError, paramiko.SSHException) as exc:
            raise HostError(f"cannot write to a process on {self.host_name}: {exc}") from exc

    def close_stdin(self) -> None:
        self._chan.shutdown_write()

    def poll(self) -> int | None:
        """The exit status (128+N if killed by signal N), or None while running or once lost."""
        if self._chan.exit_status >= 0:
            return int(self._chan.exit_status)
        return None

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the process exits, the connection is lost or `timeout` passes; then poll()."""
        self._chan.status_event.wait(timeout)
        return self.poll()

    @property
    def signal(self) -> str | None:
        """The signal name (e.g. "KILL") if the process was killed by a signal."""
        return getattr(self._chan, "exit_signal", None)

    def is_lost(self) -> bool:
        """True when the channel or transport died before an exit status arrived."""
        if self._chan.exit_status >= 0:
            return False
        return self._chan.closed or not self._transport.is_active()

    def close(self) -> None:
        self._chan.close()
