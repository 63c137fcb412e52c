"""The rendezvous store's server side: the launcher serves it on the master (see distributed.store for the protocol).

It lives beside the client because both share the framing and proof code; ranks import only the client.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import secrets
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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


class _OpError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class _Barrier:
    world_size: int
    arrived: int = 0
    generation: int = 0


class _Table:
    """The data and its one condition variable; every blocking op waits on it."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.data: dict[str, bytes] = {}
        self.barriers: dict[str, _Barrier] = {}
        self.beats: dict[int, float] = {}
        self.progress: dict[int, dict[str, Any]] = {}  # rank -> its last report, "since": when its step changed
        self.control: dict[str, Any] = {}  # what the launcher asks of every rank (e.g. {"stop": true})
        self.closed = False

    def _wait(self, ready: Callable[[], bool], timeout: float) -> bool:
        ok = self.cond.wait_for(lambda: self.closed or ready(), timeout)
        if self.closed:
            raise _OpError("closing", "the rendezvous store is shutting down")
        return ok

    def set(self, key: str, value: bytes) -> None:
        with self.cond:
            self.data[key] = bytes(value)
            self.cond.notify_all()

    def get(self, key: str, timeout: float) -> bytes:
        with self.cond:
            if not self._wait(lambda: key in self.data, timeout):
                raise _OpError("timeout", f"key {key!r} did not appear within {timeout:g} s")
            return self.data[key]

    def check(self, keys: list[str]) -> bool:
        with self.cond:
            return all(k in self.data for k in keys)

    def wait(self, keys: list[str], timeout: float) -> None:
        with self.cond:
            if not self._wait(lambda: all(k in self.data for k in keys), timeout):
                missing = [k for k in keys if k not in self.data]
                raise _OpError("timeout", f"keys {missing} did not appear within {timeout:g} s")

    def add(self, key: str, amount: int) -> int:
        with self.cond:
            try:
                value = int(self.data.get(key, b"0")) + amount
            except ValueError:
                raise _OpError("bad_request", f"key {key!r} holds a value that is not a counter") from None
            self.data[key] = str(value).encode()
            self.cond.notify_all()
            return value

    def delete(self, key: str) -> bool:
        with self.cond:
            return self.data.pop(key, None) is not None

    def barrier(self, name: str, world_size: int, timeout: float) -> None:
        with self.cond:
            state = self.barriers.setdefault(name, _Barrier(world_size))
            if state.world_size != world_size:
                if state.arrived:
                    raise _OpError("bad_request", f"barrier {name!r} called with world size {world_size} "
                                                  f"while others wait with {state.world_size}")
                state.world_size = world_size
            generation = state.generation
            state.arrived += 1
            if state.arrived == world_size:
                state.arrived, state.generation = 0, generation + 1
                self.cond.notify_all()
                return
            if not self._wait(lambda: state.generation != generation, timeout):
                arrived = state.arrived
                state.arrived -= 1  # we leave, so a retry counts us once
                raise _OpError("timeout", f"barrier {name!r} timed out after {timeout:g} s with "
                                          f"{arrived} of {world_size} ranks arrived")

    def heartbeat(self, rank: int, progress: dict[str, Any] | None = None) -> dict[str, Any]:
        """Stamp `rank` alive, keep its progress report; returns the launcher's control requests."""
        with self.cond:
            now = self.beats[rank] = time.monotonic()
            if progress is not None:
                before = self.progress.get(rank)
                moved = before is None or before.get("step") != progress.get("step")
                self.progress[rank] = {**progress, "since": now if moved else before["since"]}  # type: ignore[index]
            return dict(self.control)

    def progress_report(self) -> dict[int, dict[str, Any]]:
        """Each rank's last progress report, with "stalled": seconds since its step last changed."""
        now = time.monotonic()
        with self.cond:
            return {rank: {**p, "stalled": now - p["since"]} for rank, p in self.progress.items()}

    def heartbeat_ages(self) -> dict[int, float]:
        now = time.monotonic()
        with self.cond:
            return {rank: now - t for rank, t in self.beats.items()}

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


def _valid_progress(p: Any) -> bool:
    """A rank's progress report, as distributed.progress.Progress.snapshot makes it (the watchdog reads it)."""
    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    def seconds(v: Any) -> bool:
        return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0)

    return (isinstance(p, dict) and integer(p.get("step")) and integer(p.get("collectives", 0))
            and isinstance(p.get("doing", ""), str) and isinstance(p.get("leave", ""), str)
            and seconds(p.get("step_s")) and seconds(p.get("max_step_s")))


def _field(header: dict[str, Any], name: str, kind: type | tuple[type, ...], low: float | None = None) -> Any:
    value = header.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) or (low is not None and value < low):
        raise _OpError("bad_request", f"request field {name!r} is missing or invalid")
    return value


def _keys(header: dict[str, Any]) -> list[str]:
    keys = _field(header, "keys", list)
    if not all(isinstance(k, str) for k in keys):
        raise _OpError("bad_request", "request field 'keys' must be a list of strings")
    return keys


# --- server ---------------------------------------------------------------------------------------------


class StoreServer:
    """Serves the store from daemon threads, one per connection; the launcher also uses it directly."""

    def __init__(self, host: str = "0.0.0.0", port: int = 0, secret: str = "",
                 on_log: Callable[[str], None] | None = None, handshake_timeout: float = 5.0) -> None:
        """`secret` is required (an empty one is refused); `on_log` gets one line per refused or dropped peer
        (default: the "macrun.rendezvous" logger); `handshake_timeout` bounds an unauthenticated peer."""
        self.host, self._port = host, port
        self._secret = _Secret(secret)
        self._log = on_log or logging.getLogger("macrun.rendezvous").warning
        self._handshake_timeout = handshake_timeout
        self._table = _Table()
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
        """How many connections failed authentication so far."""
        with self._lock:
            return self._refused

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
        with selectors.DefaultSelector() as sel, self._wake_r:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)  # close() writes here to stop us
            while not self._closed:
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r:
                        return
                    try:
                        conn, addr = self._listener.accept()
                    except OSError:
                        continue
                    peer = _format_addr(addr[0], addr[1])
                    threading.Thread(target=self._serve, args=(conn, peer), name=f"rendezvous-{peer}",
                                     daemon=True).start()

    def _refuse(self, peer: str, reason: str) -> None:
        if self._closed:
            return
        with self._lock:
            self._refused += 1
        self._log(f"rendezvous: refused {peer} ({reason})")

    def _handshake(self, conn: socket.socket, peer: str) -> bool:
        deadline = time.monotonic() + self._handshake_timeout
        server_nonce = secrets.token_bytes(NONCE_BYTES)
        try:
            conn.settimeout(self._handshake_timeout)
            send_frame(conn, MAGIC + server_nonce)
            answer = recv_frame(conn, HANDSHAKE_LIMIT, deadline)
        except FrameError as e:
            reasons = {"timeout": f"no proof within {self._handshake_timeout:g} s",
                       "closed": "closed before proof"}
            self._refuse(peer, reasons.get(e.kind, "malformed handshake"))
            return False
        except OSError:
            self._refuse(peer, "closed before proof")
            return False
        if len(answer) != 2 * NONCE_BYTES:
            self._refuse(peer, "malformed handshake")
            return False
        client_nonce, proof = answer[:NONCE_BYTES], answer[NONCE_BYTES:]
        if not hmac.compare_digest(proof, self._secret.proof(server_nonce, client_nonce, _CLIENT_LABEL)):
            self._refuse(peer, "bad proof")
            send_frame(conn, _REJECT)
            return False
        send_frame(conn, _ACCEPT + self._secret.proof(client_nonce, server_nonce, _SERVER_LABEL))
        conn.settimeout(None)  # authenticated: requests may block for as long as their own timeout says
        return True

    def _serve(self, conn: socket.socket, peer: str) -> None:
        with self._lock:
            if self._closed:
                conn.close()
                return
            self._conns.add(conn)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if not self._handshake(conn, peer):
                return
            while not self._closed:
                try:
                    header = json.loads(recv_frame(conn, HEADER_LIMIT))
                    if not isinstance(header, dict):
                        raise ValueError("not an object")
                    body = recv_frame(conn, VALUE_LIMIT) if header.get("body") else None
                except ValueError:
                    self._log(f"rendezvous: dropped {peer} (bad request header)")
                    return
                reply, value = self._dispatch(header, body)
                send_frame(conn, json.dumps(reply).encode())
                if value is not None:
                    send_frame(conn, value)
        except FrameError as e:
            if e.kind != "closed" and not self._closed:
                self._log(f"rendezvous: dropped {peer} ({e})")
        except OSError:
            pass  # the peer went away; its rank's own failure is reported by the launcher
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _dispatch(self, h: dict[str, Any], body: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        t = self._table
        op = h.get("op")
        try:
            blocking = op in ("get", "wait", "barrier")
            timeout = float(_field(h, "timeout", (int, float), 0)) if blocking else 0.0
            if op == "set":
                if body is None:
                    raise _OpError("bad_request", "set needs a value frame")
                t.set(_field(h, "key", str), body)
                return {"ok": True}, None
            if op == "get":
                return {"ok": True, "body": True}, t.get(_field(h, "key", str), timeout)
            if op == "check":
                return {"ok": True, "value": t.check(_keys(h))}, None
            if op == "add":
                return {"ok": True, "value": t.add(_field(h, "key", str), _field(h, "amount", int))}, None
            if op == "wait":
                t.wait(_keys(h), timeout)
                return {"ok": True}, None
            if op == "delete":
                return {"ok": True, "value": t.delete(_field(h, "key", str))}, None
            if op == "barrier":
                t.barrier(_field(h, "name", str), _field(h, "world_size", int, 1), timeout)
                return {"ok": True}, None
            if op == "heartbeat":
                progress = h.get("progress")
                if progress is not None and not _valid_progress(progress):
                    raise _OpError("bad_request", "heartbeat progress must be an object with integer step and "
                                                  "collectives, text doing, and step_s/max_step_s numbers or null")
                control = t.heartbeat(_field(h, "rank", int, 0), progress)
                return {"ok": True, "control": control}, None
            raise _OpError("bad_request", f"unknown op {op!r}")
        except _OpError as e:
            return {"ok": False, "error": e.code, "message": e.message}, None

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
        except _OpError as e:
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


# --- client ---------------------------------------------------------------------------------------------
