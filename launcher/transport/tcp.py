"""The TCP connection under an SSH session: opened with the options SSH wants, every failure said in words.

Split from launcher/transport/ssh.py (which keeps paramiko to itself) when that module grew past 600 lines.
"""

from __future__ import annotations

import errno
import socket

from distributed.errors import HostError


def open_tcp(name: str, hostname: str, port: int, timeout: float) -> socket.socket:
    """Connect to `hostname:port`, or raise HostError naming host `name`, the reason and what to check."""
    where = f"{name} ({hostname}:{port})"
    try:
        sock = socket.create_connection((hostname, port), timeout=timeout)
    except socket.gaierror as exc:
        raise HostError(f"cannot reach {where}: name not resolved ({exc.strerror})",
                        hint=f"check the spelling of {hostname!r}, or use its IP address") from exc
    except TimeoutError as exc:
        raise HostError(f"cannot reach {where}: timed out after {timeout:g} s",
                        hint="check that the host is on and on this network") from exc
    except OSError as exc:
        reason = {errno.ECONNREFUSED: "connection refused", errno.EHOSTUNREACH: "no route to host",
                  errno.ENETUNREACH: "network unreachable"}.get(exc.errno or 0, exc.strerror or str(exc))
        hint = ("turn on Remote Login (System Settings > General > Sharing) or start sshd there, "
                "and check the port" if exc.errno == errno.ECONNREFUSED
                else "check that the host is on and on this network")
        raise HostError(f"cannot reach {where}: {reason}", hint=hint) from exc
    # Nagle plus delayed ACKs cost ~40 ms per small request/response; SSH is all of those.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux: give up on unacknowledged data after 60 s
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 60_000)
    return sock
