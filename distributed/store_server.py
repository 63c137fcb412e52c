"""The rendezvous store's server side: the launcher serves it on the master (see distributed.store for the protocol).

This module is the network side: the listener, the handshake and one thread per authenticated connection.
The data and the ops live in distributed.store_ops, the caps and the log rate limit in
distributed.store_guard. Ranks import only the client.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from distributed.errors import RendezvousError
from distributed.store import (
    _ACCEPT,
    _CLIENT_LABEL,
    _REJECT,
    _SERVER_LABEL,
    HANDSHAKE_LIMIT,
    HEADER_LIMIT,
    MAGIC,
    NONCE_BYTES,
    VALUE_LIMIT,
    FrameError,
    _format_addr,
    _Secret,
    recv_frame,
    send_frame,
)
from distributed.store_guard import Admission, LogLimiter
from distributed.store_ops import OpError, Table, decode_header, dispatch

ACCEPT_PAUSE_MAX = 0.5  # the longest pause between accept() calls that fail (out of file descriptors)


class StoreServer:
    """Serves the store from daemon threads, one per connection; the launcher also uses it directly."""

    def __init__(self, host: str = "0.0.0.0", port: int = 0, secret: str = "",
                 on_log: Callable[[str], None] | None = None, handshake_timeout: float = 5.0, *,
                 max_pending: int = 64, max_pending_per_peer: int = 16,
                 log_burst: int = 5, log_interval: float = 10.0) -> None:
        """`secret` is required (an empty one is refused). `on_log` gets a line per refused or dropped peer
        (default: the "macrun.rendezvous" logger), at most `log_burst` per peer address in `log_interval` s;
        the lines beyond are counted into that address's next line. `handshake_timeout` bounds an
        unauthenticated peer; at most `max_pending` of them (`max_pending_per_peer` per address) are
        served at once, and connections over either cap are closed as soon as they are accepted."""
        self.host, self._port = host, port
        self._secret = _Secret(secret)
        self._log = LogLimiter(on_log or logging.getLogger("macrun.rendezvous").warning, log_burst, log_interval)
        self._handshake_timeout = handshake_timeout
        self._admission = Admission(max_pending, max_pending_per_peer)
        self._table = Table()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._refused = 0
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._closed = False

    @property
    def port(self) -> int:
        """The port actually bound (meaningful after `start()`)."""
        return self._port

    @property
    def refused(self) -> int:
        """How many connections were refused: failed authentication, or over a cap on unauthenticated ones."""
        with self._lock:
            return self._refused

    @property
    def pending(self) -> int:
        """How many connections are still in the handshake (not yet authenticated)."""
        return self._admission.pending

    def start(self) -> None:
        """Bind, listen and accept in a daemon thread."""
        if self._listener is not None:
            return
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self._port))
            listener.listen(128)
        except OSError as e:
            listener.close()
            raise RendezvousError(
                f"cannot serve the rendezvous on {_format_addr(self.host, self._port)} ({e.strerror})",
                hint="choose another port (--master-port) or stop what is using it") from None
        listener.setblocking(False)
        self._listener, self._port = listener, listener.getsockname()[1]
        threading.Thread(target=self._accept_loop, name="rendezvous-accept", daemon=True).start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        pause = 0.0
        # Both selectors are made up front: once descriptors run out, a new one could not be.
        with selectors.DefaultSelector() as sel, selectors.DefaultSelector() as idle, self._wake_r:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)  # close() writes here to stop us
            idle.register(self._wake_r, selectors.EVENT_READ)
            while not self._closed:
                if any(key.fileobj is self._wake_r for key, _ in sel.select()):
                    return
                try:
                    conn, addr = self._listener.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue  # nothing there after all, or the peer gave up before we took it
                except OSError as e:
                    # Out of file descriptors (EMFILE/ENFILE) or buffers: the listener stays readable, so
                    # retrying at once would spin a core. Pause, doubling up to ACCEPT_PAUSE_MAX; the
                    # handshake timeout meanwhile frees the descriptors that silent peers hold.
                    pause = min(max(2 * pause, 0.01), ACCEPT_PAUSE_MAX)
                    self._log("accept", f"rendezvous: cannot accept connections ({e.strerror or e}); "
                                        f"retrying in up to {ACCEPT_PAUSE_MAX:g} s", more="accept failures")
                    if idle.select(pause):
                        return
                    continue
                pause = 0.0
                self._admit(conn, addr[0], _format_addr(addr[0], addr[1]))

    def _admit(self, conn: socket.socket, host: str, peer: str) -> None:
        refusal = self._admission.admit(host)
        if refusal is None:
            try:
                threading.Thread(target=self._serve, args=(conn, host, peer), name=f"rendezvous-{peer}",
                                 daemon=True).start()
                return
            except RuntimeError:  # no thread could be started: the same as a cap, for this connection
                self._admission.settle(host)
                refusal = "no thread left to serve it"
        conn.close()
        self._refuse(host, peer, refusal)

    def _refuse(self, host: str, peer: str, reason: str) -> None:
        if self._closed:
            return
        with self._lock:
            self._refused += 1
        self._log(host, f"rendezvous: refused {peer} ({reason})")

    def _handshake(self, conn: socket.socket, host: str, peer: str) -> bool:
        deadline = time.monotonic() + self._handshake_timeout
        server_nonce = secrets.token_bytes(NONCE_BYTES)
        try:
            conn.settimeout(self._handshake_timeout)
            send_frame(conn, MAGIC + server_nonce)
            answer = recv_frame(conn, HANDSHAKE_LIMIT, deadline)
        except FrameError as e:
            reasons = {"timeout": f"no proof within {self._handshake_timeout:g} s",
                       "closed": "closed before proof"}
            self._refuse(host, peer, reasons.get(e.kind, "malformed handshake"))
            return False
        except OSError:
            self._refuse(host, peer, "closed before proof")
            return False
        if len(answer) != 2 * NONCE_BYTES:
            self._refuse(host, peer, "malformed handshake")
            return False
        client_nonce, proof = answer[:NONCE_BYTES], answer[NONCE_BYTES:]
        if not hmac.compare_digest(proof, self._secret.proof(server_nonce, client_nonce, _CLIENT_LABEL)):
            self._refuse(host, peer, "bad proof")
            send_frame(conn, _REJECT)
            return False
        send_frame(conn, _ACCEPT + self._secret.proof(client_nonce, server_nonce, _SERVER_LABEL))
        conn.settimeout(None)  # authenticated: requests may block for as long as their own timeout says
        return True

    def _serve(self, conn: socket.socket, host: str, peer: str) -> None:
        settled = False
        with self._lock:
            if self._closed:
                self._admission.settle(host)
                conn.close()
                return
            self._conns.add(conn)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            authenticated = self._handshake(conn, host, peer)
            self._admission.settle(host)
            settled = True
            if authenticated:
                self._serve_requests(conn, host, peer)
        except FrameError as e:
            if e.kind != "closed" and not self._closed:
                self._log(host, f"rendezvous: dropped {peer} ({e})")
        except OSError:
            pass  # the peer went away; its rank's own failure is reported by the launcher
        finally:
            if not settled:
                self._admission.settle(host)
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _serve_requests(self, conn: socket.socket, host: str, peer: str) -> None:
        while not self._closed:
            try:
                header = decode_header(recv_frame(conn, HEADER_LIMIT))
            except OpError as e:  # framed, but refused unread: answer, then close (a value frame may follow)
                send_frame(conn, json.dumps(e.reply()).encode())
                self._log(host, f"rendezvous: dropped {peer} ({e.message})")
                return
            except ValueError:
                self._log(host, f"rendezvous: dropped {peer} (bad request header)")
                return
            body = recv_frame(conn, VALUE_LIMIT) if header.get("body") else None
            try:
                reply, value = dispatch(self._table, header, body)
                payload = json.dumps(reply).encode()
            except Exception as e:  # a bug costs this request an error reply, not the thread and a traceback
                self._log(host, f"rendezvous: a request from {peer} failed ({type(e).__name__}: {e})"[:300])
                reply, value = {"ok": False, "error": "internal", "message": "the rendezvous store failed on "
                                f"this request ({type(e).__name__})"}, None
                payload = json.dumps(reply).encode()
            send_frame(conn, payload)
            if value is not None:
                send_frame(conn, value)

    # The launcher's direct access (same data, no socket).
    def set(self, key: str, value: bytes) -> None:
        """Store `value` under `key`, waking anyone waiting for it."""
        self._table.set(key, value)

    def get_nowait(self, key: str) -> bytes | None:
        """The value under `key`, or None."""
        with self._table.cond:
            return self._table.data.get(key)

    def add(self, key: str, amount: int = 1) -> int:
        """Atomically add to the counter under `key`; returns the new value."""
        try:
            return self._table.add(key, amount)
        except OpError as e:
            raise RendezvousError(e.message) from None

    def set_json(self, key: str, obj: Any) -> None:
        self.set(key, json.dumps(obj).encode())

    def get_json_nowait(self, key: str) -> Any:
        raw = self.get_nowait(key)
        return None if raw is None else json.loads(raw)

    def heartbeat_ages(self) -> dict[int, float]:
        """Seconds since each rank's last heartbeat (server clock); ranks never heard from are absent."""
        return self._table.heartbeat_ages()

    def progress_report(self) -> dict[int, dict[str, Any]]:
        """Each rank's last progress report (step, doing, step_s, ...) with "stalled": seconds since its
        step last changed (server clock); ranks that never reported are absent."""
        return self._table.progress_report()

    def request(self, **control: Any) -> None:
        """Ask every rank something through its next heartbeat reply (e.g. request(stop=True))."""
        with self._table.cond:
            self._table.control.update(control)

    def close(self) -> None:
        """Stop serving: close the listener and every connection; blocked clients get RendezvousError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns)
        self._table.close()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # the accept thread saw `_closed` first and has already gone
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recv on it
            except OSError:
                pass
        if self._listener is not None:
            self._listener.close()
        else:
            self._wake_r.close()  # no accept thread owns it
        self._wake_w.close()

    def __enter__(self) -> StoreServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "serving" if self._listener else "not started"
        return f"StoreServer({_format_addr(self.host, self.port)}, {state}, refused={self.refused})"
