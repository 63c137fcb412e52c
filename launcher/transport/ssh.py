"""SSH to the hosts: connect (agent, keys, ~/.ssh/config, known_hosts), run commands, stream, SFTP.

This module and launcher/transport/sshconn.py (what runs over a connection) are the only ones that import paramiko.
One transport per host carries every command and the SFTP session.
known_hosts files are read by launcher/room/known_hosts.py, shell words made by launcher/transport/shell.py, the TCP
connection opened by launcher/transport/tcp.py.
"""

from __future__ import annotations

import dataclasses
import getpass
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import paramiko
from paramiko.common import MSG_CHANNEL_REQUEST

from distributed.errors import HostError
from launcher.room import known_hosts
from launcher.room.hosts import HostSpec
from launcher.transport.shell import expand_home
from launcher.transport.shell import shell_quote as shell_quote  # re-exported: callers quote with ssh.shell_quote
from launcher.transport.sshconn import KEEPALIVE_S as KEEPALIVE_S
from launcher.transport.sshconn import SFTP_TIMEOUT_S as SFTP_TIMEOUT_S
from launcher.transport.sshconn import TRANSFER_ERRORS as TRANSFER_ERRORS
from launcher.transport.sshconn import CommandResult as CommandResult
from launcher.transport.sshconn import RemoteProcess as RemoteProcess
from launcher.transport.sshconn import SSHConnection as SSHConnection
from launcher.transport.sshconn import SSHTarget as SSHTarget
from launcher.transport.tcp import open_tcp

# paramiko logs handshake failures at ERROR; without a handler Python would print them to stderr,
# and library code never prints: every failure reaches the caller as a HostError instead.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")
def resolve_target(host: HostSpec) -> SSHTarget:
    """Merge ~/.ssh/config (HostName, User, Port, IdentityFile) with `host`; the HostSpec's fields win."""
    cfg: dict[str, Any] = {}
    path = Path.home() / ".ssh" / "config"
    if path.is_file():
        try:
            cfg = dict(paramiko.SSHConfig.from_path(str(path)).lookup(host.hostname))
        except Exception as exc:  # paramiko raises several types for a bad config line
            raise HostError(f"cannot read {path} for host {host.name}: {exc}",
                            hint=f"fix the Host entry for {host.hostname} in {path}") from exc
    hostname = str(cfg.get("hostname") or host.hostname)
    port = host.port or int(cfg.get("port") or 22)
    user = host.user or str(cfg.get("user") or "") or getpass.getuser()
    identity = tuple(os.path.expanduser(p) for p in cfg.get("identityfile") or ())
    known = [Path(os.path.expanduser(p)) for p in str(cfg.get("userknownhostsfile") or "").split()]
    known = known or [Path.home() / ".ssh" / "known_hosts"]
    known.append(Path("/etc/ssh/ssh_known_hosts"))
    only = str(cfg.get("identitiesonly") or "no").lower() == "yes"
    return SSHTarget(hostname, port, user, identity, only, tuple(known))


def key_fingerprint(key: paramiko.PKey) -> str:
    """`SHA256:…` exactly as `ssh-keygen -lf` prints it (unpadded base64 of the key blob's SHA-256)."""
    return known_hosts.fingerprint(key.asbytes())


def describe_key(key: paramiko.PKey) -> str:
    """`ED25519 SHA256:…`: the key type as ssh-keygen names it, then its fingerprint."""
    return f"{key.algorithm_name} {key_fingerprint(key)}"


# ---- connecting -------------------------------------------------------------------------------

def connect(host: HostSpec, *, timeout: float = 10.0, accept_new_host_key: bool = False) -> SSHConnection:
    """Open an authenticated SSH connection to `host`, or raise HostError saying why and what to do.

    The host key must already be in known_hosts (hashed entries and `[host]:port` included); an unknown
    key is refused unless `accept_new_host_key`, which records it (like `StrictHostKeyChecking=accept-new`);
    a changed or `@revoked` key is always refused. A leading `~` in the host's python/workdir is resolved to
    its home folder (one extra command, only when python has one); `conn.host` holds the result.
    Keys tried in order: `host.key_file`, ~/.ssh/config IdentityFile, the ssh-agent, then
    ~/.ssh/id_{ed25519,ecdsa,rsa}.
    """
    target = resolve_target(host)
    deadline = time.monotonic() + timeout
    sock = open_tcp(host.name, target.hostname, target.port, timeout)
    transport: paramiko.Transport | None = None
    conn: SSHConnection | None = None
    try:
        known = _known_keys(target)
        transport = _handshake(sock, host, target, deadline, known)
        _check_host_key(transport.get_remote_server_key(), host, target, accept_new_host_key, known)
        _authenticate(transport, host, target, deadline)
        conn = SSHConnection(host, target, transport, sock)
        if host.python == "~" or host.python.startswith("~/"):
            # The rank's interpreter starts without a shell (argv travels as JSON): make it absolute.
            conn.host = dataclasses.replace(host, python=expand_home(host.python, conn.home()),
                                            workdir=expand_home(host.workdir, conn.home()))
    except BaseException:
        if conn is not None:
            conn.close()
        elif transport is not None:
            transport.close()
        sock.close()
        raise
    return conn


def connect_all(hosts: Sequence[HostSpec], *, timeout: float = 10.0,
                accept_new_host_key: bool = False) -> list[SSHConnection]:
    """Connect to every host in parallel; on any failure close the rest and raise one HostError."""
    if not hosts:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        futures = [pool.submit(connect, h, timeout=timeout, accept_new_host_key=accept_new_host_key)
                   for h in hosts]
        outcomes: list[SSHConnection | BaseException] = []
        for fut in futures:
            try:
                outcomes.append(fut.result())
            except Exception as exc:
                outcomes.append(exc)
    failed = [(h, o) for h, o in zip(hosts, outcomes, strict=True) if isinstance(o, BaseException)]
    if not failed:
        return [o for o in outcomes if isinstance(o, SSHConnection)]
    for o in outcomes:
        if isinstance(o, SSHConnection):
            o.close()
    if len(failed) == 1 and isinstance(failed[0][1], HostError):
        raise failed[0][1]  # one host: its own message and hint say it best
    names = ", ".join(h.name for h, _ in failed)
    lines = [f"cannot connect to {len(failed)} of {len(hosts)} hosts ({names}):"]
    lines += [f"  {h.name}: {exc}" for h, exc in failed]
    hints = [f"{h.name}: {exc.hint}" for h, exc in failed if isinstance(exc, HostError) and exc.hint]
    raise HostError("\n".join(lines), hint="; ".join(hints) or None) from failed[0][1]


def _handshake(sock: socket.socket, host: HostSpec, target: SSHTarget, deadline: float,
               known: known_hosts.HostKeys) -> paramiko.Transport:
    transport = paramiko.Transport(sock)
    _install_exit_signal_handler(transport)
    remaining = max(0.5, deadline - time.monotonic())
    transport.banner_timeout = remaining
    transport.auth_timeout = remaining
    if known:
        # Ask for the key type(s) we already know, as OpenSSH does, so a host with several keys
        # does not look "changed" just because it offered another type first.
        opts = transport.get_security_options()
        wanted: list[str] = []
        for kind in known.key_types():
            wanted += ["rsa-sha2-512", "rsa-sha2-256", kind] if kind == "ssh-rsa" else [kind]
        opts.key_types = [k for k in wanted if k in opts.key_types] + [
            k for k in opts.key_types if k not in wanted]
    hint = "check that this port runs an SSH server (Remote Login) and the host is not overloaded"
    try:
        transport.start_client(timeout=remaining)
    except (paramiko.SSHException, EOFError, OSError) as exc:
        transport.close()
        raise HostError(f"SSH handshake with {host.name} ({target.hostname}:{target.port}) failed: "
                        f"{exc or type(exc).__name__}", hint=hint) from exc
    if not (transport.is_active() and transport.initial_kex_done):  # start_client returns on timeout
        transport.close()
        raise HostError(f"SSH handshake with {host.name} ({target.hostname}:{target.port}) timed out "
                        f"after {remaining:.1f} s", hint=hint)
    return transport


def _known_keys(target: SSHTarget) -> known_hosts.HostKeys:
    return known_hosts.lookup(target.known_hosts_files, target.known_hosts_name)


def _check_host_key(offered: paramiko.PKey, host: HostSpec, target: SSHTarget, accept_new: bool,
                    known: known_hosts.HostKeys | None = None) -> bool:
    """True if `offered` is on file for the host; False if it was unknown and `accept_new` added it.

    HostError if it is unknown (and not `accept_new`), revoked, or another key is on file.
    """
    known = _known_keys(target) if known is None else known
    where = f"{host.name} ({target.hostname}:{target.port})"
    if known_hosts.verify(known, offered.get_name(), offered.asbytes(), where=where, host=host.name):
        return True
    if accept_new:
        known_hosts.append(target.known_hosts_files[0], known.name, offered.get_name(), offered.get_base64())
        return False
    raise HostError(
        f"the host key of {where} is not known: {describe_key(offered)}",
        hint=(f"if that fingerprint is right (on the host: `ssh-keygen -lf /etc/ssh/ssh_host_"
              f"{offered.algorithm_name.lower()}_key.pub`), trust it with `macrun hosts trust "
              f"{host.name}` or `ssh-keyscan -p {target.port} {target.hostname} >> ~/.ssh/known_hosts`"))


@dataclasses.dataclass(frozen=True)
class OfferedHostKey:
    """The key a host offered, neither revoked nor contradicting known_hosts; `known`: already on file."""

    host: HostSpec
    target: SSHTarget
    key: paramiko.PKey
    known: bool

    def trust(self) -> None:
        """Add the key to the user's known_hosts (once: nothing happens when it is already there)."""
        _check_host_key(self.key, self.host, self.target, accept_new=True)


def fetch_host_key(host: HostSpec, *, timeout: float = 10.0) -> OfferedHostKey:
    """Ask `host` for its key without logging in; HostError if it is revoked or another key is on file."""
    target = resolve_target(host)
    sock = open_tcp(host.name, target.hostname, target.port, timeout)
    try:
        known = _known_keys(target)
        transport = _handshake(sock, host, target, time.monotonic() + timeout, known)
        try:
            key = transport.get_remote_server_key()
        finally:
            transport.close()
    finally:
        sock.close()
    where = f"{host.name} ({target.hostname}:{target.port})"
    return OfferedHostKey(host, target, key, known_hosts.verify(known, key.get_name(), key.asbytes(),
                                                                where=where, host=host.name))


def trust_host_key(host: HostSpec, *, timeout: float = 10.0) -> str:
    """Fetch `host`'s key and add it to ~/.ssh/known_hosts; return its `SHA256:…` fingerprint.

    Raises HostError if the key is revoked or a different one is on file (that needs `ssh-keygen -R`).
    """
    offer = fetch_host_key(host, timeout=timeout)
    offer.trust()
    return key_fingerprint(offer.key)


def _authenticate(transport: paramiko.Transport, host: HostSpec, target: SSHTarget, deadline: float) -> None:
    tried: list[str] = []
    seen: set[bytes] = set()
    agent: paramiko.Agent | None = None

    def agent_keys() -> list[paramiko.PKey]:
        nonlocal agent
        try:
            agent = paramiko.Agent()
            return list(agent.get_keys())
        except (paramiko.SSHException, OSError) as exc:
            tried.append(f"ssh-agent (unusable: {exc})")
            return []

    try:
        for label, key in _candidate_keys(host, target, tried, agent_keys):
            if key.asbytes() in seen:
                continue
            seen.add(key.asbytes())
            tried.append(f"{label} ({describe_key(key)})")
            if time.monotonic() > deadline:
                break
            try:
                if not transport.auth_publickey(target.user, key):
                    return
                tried[-1] += " [accepted, but the server wants a second factor]"
            except paramiko.BadAuthenticationType as exc:
                tried[-1] += f" [server allows only: {', '.join(exc.allowed_types)}]"
                break
            except paramiko.AuthenticationException:
                continue
            except (paramiko.SSHException, EOFError, OSError) as exc:
                # Often sshd's MaxAuthTries (6): an agent full of keys uses them up before the right one.
                raise HostError(
                    f"{host.name} ({target.label}) closed the connection while logging in, after trying "
                    f"{'; '.join(tried)}", hint=f"set \"identity_file\" for {host.name} in hosts.json to the "
                    "right key, or `IdentitiesOnly yes` for it in ~/.ssh/config") from exc
    finally:
        if agent is not None:
            agent.close()

    what = "; ".join(tried) if tried else "no key at all (no ssh-agent, no ~/.ssh/id_* key, no identity_file)"
    raise HostError(
        f"cannot log in to {target.label} ({host.name}): no key was accepted; tried {what}",
        hint=(f"copy your public key there (`ssh-copy-id -p {target.port} {target.user}@{target.hostname}`), "
              f"or set \"identity_file\" (or \"user\") for {host.name} in hosts.json"))


def _candidate_keys(host: HostSpec, target: SSHTarget, tried: list[str],
                    agent_keys: Callable[[], list[paramiko.PKey]]) -> Iterator[tuple[str, paramiko.PKey]]:
    """Yield (label, key): the hosts.json key, config IdentityFiles, agent keys, default keys."""
    if host.key_file:
        path = os.path.expanduser(host.key_file)
        key, problem = _load_private_key(path)
        if key is None and problem.startswith("encrypted"):
            tried.append(f"{path} ({problem})")  # the agent may hold it; tried below
        elif key is None:
            raise HostError(f"cannot use key file {path} for {target.label} ({host.name}): {problem}",
                            hint=f"fix or remove \"identity_file\" for {host.name} in hosts.json")
        else:
            yield path, key
    yield from _existing_keys(target.identity_files, tried)
    if target.identities_only:
        return
    for key in agent_keys():
        yield "ssh-agent key", key
    if target.identity_files:
        return  # like OpenSSH: an explicit IdentityFile replaces the default key list
    yield from _existing_keys([str(Path.home() / ".ssh" / name) for name in DEFAULT_KEYS], tried)


def _existing_keys(paths: Sequence[str], tried: list[str]) -> Iterator[tuple[str, paramiko.PKey]]:
    """The keys in those of `paths` that exist; unusable ones are noted in `tried` with the reason."""
    for path in paths:
        if os.path.exists(path):
            key, problem = _load_private_key(path)
            if key is None:
                tried.append(f"{path} ({problem})")
            else:
                yield path, key


def _load_private_key(path: str) -> tuple[paramiko.PKey | None, str]:
    """Load a private key file; on failure return (None, the reason in words)."""
    try:
        return paramiko.PKey.from_path(path), ""
    except paramiko.PasswordRequiredException:
        return None, f"encrypted: add it to the ssh-agent with `ssh-add {path}`"
    except FileNotFoundError:
        return None, "no such file"
    except PermissionError:
        return None, "permission denied"
    except IsADirectoryError:
        return None, "is a directory"
    except Exception as exc:  # cryptography and paramiko raise many types for a malformed key
        if isinstance(exc, TypeError) and "password" in str(exc).lower():  # cryptography's "encrypted"
            return None, f"encrypted: add it to the ssh-agent with `ssh-add {path}`"
        return None, f"not a private key paramiko can read ({type(exc).__name__}: {exc})"


def _install_exit_signal_handler(transport: paramiko.Transport) -> None:
    """Record `exit-signal` (a remote process killed by a signal) as exit status 128+N, as shells do.

    paramiko ignores that message, so a killed rank would look like a lost connection. This wraps
    paramiko's per-transport dispatch table entry for channel requests; if that internal ever moves,
    a killed process is merely reported as lost.
    """
    table = getattr(transport, "_channel_handler_table", None)
    if not isinstance(table, dict) or MSG_CHANNEL_REQUEST not in table:
        return
    original = table[MSG_CHANNEL_REQUEST]

    def handle(chan: paramiko.Channel, m: paramiko.Message) -> None:
        start = m.packet.tell()
        if m.get_text() == "exit-signal":
            m.get_boolean()  # want_reply: never set for exit-signal
            name = m.get_text()
            chan.exit_signal = name  # type: ignore[attr-defined]
            sig = getattr(signal, f"SIG{name}", None)
            chan.exit_status = 128 + (int(sig) if sig is not None else 0)
            chan.status_event.set()
            return
        m.packet.seek(start)
        original(chan, m)

    transport._channel_handler_table = {**table, MSG_CHANNEL_REQUEST: handle}  # type: ignore[attr-defined]

