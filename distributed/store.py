"""The rendezvous store: a small authenticated TCP key-value store that the launcher serves on the master.

Every rank (and the launcher itself) uses it to meet: publish addresses, count arrivals, pass barriers and
send heartbeats. Stdlib only, because it is imported on every remote host.

Protocol
--------
Framing: every message is a frame, a 4-byte big-endian length followed by that many bytes. A request is a
JSON header frame (``{"op": "set", "key": "k", "body": true}``) optionally followed by one raw-bytes frame
(values are bytes, never pickle); a reply is a JSON header (``{"ok": true, ...}`` or ``{"ok": false,
"error": code, "message": text}``) optionally followed by one bytes frame. Headers are limited to
``HEADER_LIMIT`` (64 KiB), values to ``VALUE_LIMIT`` (64 MiB); a frame over its limit or a header that is
not a JSON object closes the connection. A frame's buffer grows with the bytes that arrive, never with the
length announced. A header nested deeper than 64 levels gets a ``bad_header`` reply, then the connection
closes (whether a value frame follows cannot be known). A blocking op's ``timeout`` must be a number >= 0;
NaN or a negative one is refused, one over ``MAX_WAIT_S`` (24 h, Infinity included) is clamped to it.

Authentication comes first and is mutual; nothing else is read before it succeeds:

1. server -> client: ``MAGIC || server_nonce`` (32 random bytes);
2. client -> server: ``client_nonce || HMAC-SHA256(secret, server_nonce || client_nonce || "client")``;
3. server checks with ``hmac.compare_digest``; on failure it sends ``\\x00`` and closes, on success
   ``\\x01 || HMAC-SHA256(secret, client_nonce || server_nonce || "server")``, which the client checks in
   turn, so a rank never talks to an impostor. The distinct labels stop a proof being reflected back.

A peer that sends no valid proof within ``handshake_timeout`` (5 s), sends garbage or an oversized frame is
disconnected, counted in ``StoreServer.refused`` and logged ("rendezvous: refused 10.0.0.7:53122 (bad
proof)"; past a few lines per address in 10 s, the rest are counted into that address's next line);
everyone else is unaffected (one thread per connection). Unauthenticated connections are capped (64 in
all, 16 per address by default): the ones over a cap are closed as soon as they are accepted. The secret
itself never crosses the wire and never appears in a repr, an exception or a log line. Traffic is not
encrypted: values travel in clear on the LAN, so the store carries coordinates, never credentials.

Ops: set, get (blocks until the key exists), check, add (atomic integer counter stored as ASCII
digits), wait, delete, barrier (reusable: each round that completes bumps a per-name generation) and
heartbeat (the server stamps its own monotonic clock, so hosts' clock skew does not matter).

This module holds the protocol and the client (imported on every host); the launcher's server is in
distributed.store_server (the network side) and distributed.store_ops (the data and the ops), a rank's
heartbeat thread in distributed.heartbeat.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import socket
import struct
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from distributed.errors import RendezvousError

if TYPE_CHECKING:
    from distributed.env import RankEnv

HEADER_LIMIT = 64 * 1024
VALUE_LIMIT = 64 * 1024 * 1024
HANDSHAKE_LIMIT = 256
MAGIC = b"macrun-rendezvous/1 "
NONCE_BYTES = 32
MAX_WAIT_S = 24 * 3600.0  # the longest a blocking op waits; longer (or infinite) timeouts are clamped to it
_CHUNK = 1 << 20  # the most one recv reads, and the most a frame's buffer grows by ahead of its bytes
_LEN = struct.Struct(">I")
_CLIENT_LABEL, _SERVER_LABEL = b"client", b"server"
_ACCEPT, _REJECT = b"\x01", b"\x00"
_LOST_HINT = "the launcher on the master stopped, or the network between this host and the master dropped"


def new_secret() -> str:
    """A fresh per-run secret (64 hex characters) for `MACRUN_SECRET`."""
    return secrets.token_hex(32)


class _Secret:
    """Holds the secret so that no repr, traceback-with-locals or f-string can show it."""

    __slots__ = ("_key",)

    def __init__(self, secret: str) -> None:
        if not secret:
            raise RendezvousError("the rendezvous secret is empty",
                                  hint="start ranks with `macrun`, which sets MACRUN_SECRET")
        self._key = secret.encode()

    def proof(self, first: bytes, second: bytes, label: bytes) -> bytes:
        return compute_proof(self._key, first, second, label)

    def reveal(self) -> str:
        return self._key.decode()

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


def compute_proof(key: bytes, first: bytes, second: bytes, label: bytes) -> bytes:
    """HMAC-SHA256(key, first || second || label): the handshake's proof of knowing the secret."""
    return hmac.new(key, first + second + label, hashlib.sha256).digest()


# --- framing ---------------------------------------------------------------------------------------------


class FrameError(RendezvousError):
    """A frame could not be read; `kind` is "closed", "oversized" or "timeout"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def encode_frame(payload: bytes) -> bytes:
    """Length prefix + payload."""
    return _LEN.pack(len(payload)) + bytes(payload)


def send_frame(sock: socket.socket, payload: bytes) -> None:
    """Send one frame; large payloads go without an extra copy."""
    if len(payload) <= HEADER_LIMIT:
        sock.sendall(encode_frame(payload))
    else:
        sock.sendall(_LEN.pack(len(payload)))
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytes:
    """Read exactly `n` bytes. Memory follows the bytes that arrived, not the length announced: a peer that
    announces 64 MiB and sends nothing costs one HEADER_LIMIT-sized buffer, not 64 MiB."""
    chunks: list[bytearray] = []
    got = 0
    while got < n:
        # Each buffer is as large as what has arrived so far (at least HEADER_LIMIT, at most _CHUNK), so a
        # big value still arrives in few buffers while an announced size is never allocated in advance.
        buf = bytearray(min(n - got, _CHUNK, max(HEADER_LIMIT, got)))
        view, filled = memoryview(buf), 0
        while filled < len(buf):
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FrameError("timeout", f"timed out after {got + filled} of {n} bytes")
                sock.settimeout(left)
            try:
                k = sock.recv_into(view[filled:])
            except TimeoutError:
                raise FrameError("timeout", f"timed out after {got + filled} of {n} bytes") from None
            if k == 0:
                raise FrameError("closed", f"peer closed the connection after {got + filled} of {n} bytes")
            filled += k
        chunks.append(buf)
        got += filled
    return bytes(chunks[0]) if len(chunks) == 1 else b"".join(chunks)


def recv_frame(sock: socket.socket, limit: int, deadline: float | None = None) -> bytes:
    """Read one frame of at most `limit` bytes, by the monotonic `deadline` if given.

    The length is checked before the body is read, so a huge length prefix costs nothing."""
    (n,) = _LEN.unpack(_recv_exact(sock, 4, deadline))
    if n > limit:
        raise FrameError("oversized", f"frame of {n} bytes is over the {limit}-byte limit")
    return _recv_exact(sock, n, deadline)


def _format_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- client ---------------------------------------------------------------------------------------------


class StoreClient:
    """One authenticated connection to the store; thread-safe (one request at a time on the wire)."""

    def __init__(self, host: str, port: int, secret: str, timeout: float = 30.0,
                 connect_timeout: float = 10.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.address = _format_addr(host, port)
        self._secret = _Secret(secret)
        self._lock = threading.Lock()
        self._closed = False
        self._sock: socket.socket | None = self._connect(connect_timeout)

    @classmethod
    def from_env(cls, env: RankEnv, timeout: float = 30.0) -> StoreClient:
        """Connect to the store named by the env contract (MACRUN_STORE_ADDR/PORT, else MASTER_ADDR/PORT)."""
        port = env.store_port if env.store_port is not None else env.master_port
        return cls(env.store_addr or env.master_addr, port, env.secret, timeout=timeout)

    def clone(self, timeout: float | None = None, connect_timeout: float = 10.0) -> StoreClient:
        """A second connection to the same store, for a thread that must not queue behind this one."""
        return StoreClient(self.host, self.port, self._secret.reveal(),
                           timeout=self.timeout if timeout is None else timeout, connect_timeout=connect_timeout)

    def _connect(self, connect_timeout: float) -> socket.socket:
        deadline = time.monotonic() + connect_timeout
        pause = 0.05
        while True:
            try:
                left = max(0.1, min(self.timeout, deadline - time.monotonic()))
                sock = socket.create_connection((self.host, self.port), timeout=left)
                break
            except (ConnectionRefusedError, ConnectionResetError) as e:
                # The launcher starts the store before any rank, but a restarting listener can lag a moment.
                if time.monotonic() + pause > deadline:
                    raise RendezvousError(f"cannot reach the rendezvous at {self.address} ({e.strerror})",
                                          hint=_reach_hint(self.port)) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.5)
            except OSError as e:
                why = e.strerror or type(e).__name__
                raise RendezvousError(f"cannot reach the rendezvous at {self.address} ({why})",
                                      hint=_reach_hint(self.port)) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            self._handshake(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    def _handshake(self, sock: socket.socket) -> None:
        deadline = time.monotonic() + self.timeout
        try:
            greeting = recv_frame(sock, HANDSHAKE_LIMIT, deadline)
            if not greeting.startswith(MAGIC) or len(greeting) != len(MAGIC) + NONCE_BYTES:
                raise RendezvousError(f"{self.address} is not a macrun rendezvous store (odd greeting)",
                                      hint="check MASTER_ADDR and MACRUN_STORE_PORT")
            server_nonce, client_nonce = greeting[len(MAGIC):], secrets.token_bytes(NONCE_BYTES)
            send_frame(sock, client_nonce + self._secret.proof(server_nonce, client_nonce, _CLIENT_LABEL))
            verdict = recv_frame(sock, HANDSHAKE_LIMIT, deadline)
        except FrameError as e:
            raise RendezvousError(f"rendezvous at {self.address} dropped us during the handshake ({e})",
                                  hint=_LOST_HINT) from None
        except OSError as e:
            raise RendezvousError(f"rendezvous at {self.address} failed during the handshake ({e.strerror})",
                                  hint=_LOST_HINT) from None
        if verdict == _REJECT:
            raise RendezvousError(
                f"rendezvous at {self.address} refused our proof: wrong secret",
                hint="every rank must get MACRUN_SECRET from the same `macrun` launch; a rank left over from "
                     "an earlier run, or another run's store on this port, has a different one")
        expected = self._secret.proof(client_nonce, server_nonce, _SERVER_LABEL)
        if verdict[:1] != _ACCEPT or not hmac.compare_digest(verdict[1:], expected):
            raise RendezvousError(
                f"the server at {self.address} could not prove it knows this run's secret (an impostor, "
                "or another run's store)", hint="check MASTER_ADDR and MACRUN_STORE_PORT")

    def _request(self, header: dict[str, Any], body: bytes | None = None,
                 wait: float = 0.0) -> tuple[dict[str, Any], bytes | None]:
        if body is not None:
            if len(body) > VALUE_LIMIT:
                raise RendezvousError(f"value for {header.get('key')!r} is {len(body)} bytes, over the "
                                      f"{VALUE_LIMIT >> 20} MiB limit", hint="store a path, not the data")
            header["body"] = True
        with self._lock:
            sock = self._sock
            if sock is None or self._closed:
                raise RendezvousError(f"the connection to the rendezvous at {self.address} is closed",
                                      hint=_LOST_HINT)
            try:
                sock.settimeout(wait + self.timeout)  # the server may legitimately hold us for `wait`
                send_frame(sock, json.dumps(header).encode())
                if body is not None:
                    send_frame(sock, body)
                reply = json.loads(recv_frame(sock, HEADER_LIMIT))
                if not isinstance(reply, dict):
                    raise ValueError("reply is not a JSON object")
                value = recv_frame(sock, VALUE_LIMIT) if reply.get("body") else None
            except (FrameError, OSError, ValueError) as e:
                self._sock = None  # a half-read reply leaves the stream unusable
                sock.close()
                why = "we closed it" if self._closed else str(e) if isinstance(e, FrameError) else \
                    (getattr(e, "strerror", None) or type(e).__name__)
                raise RendezvousError(f"lost the rendezvous at {self.address} ({why})",
                                      hint=_LOST_HINT) from None
        if not reply.get("ok"):
            hint = {"timeout": "a rank that should have got there may have failed or not started; "
                               "see the other ranks' logs"}.get(reply.get("error", ""))
            raise RendezvousError(f"rendezvous at {self.address}: {reply.get('message')}", hint=hint)
        return reply, value

    def _timeout(self, timeout: float | None) -> float:
        """Seconds a blocking op may wait: negative means 0, anything over MAX_WAIT_S (inf too) means MAX_WAIT_S."""
        if timeout is None:
            return self.timeout
        try:
            seconds = float(timeout)
        except OverflowError:  # an int too large for a float
            seconds = math.inf
        if math.isnan(seconds):
            raise RendezvousError("a rendezvous timeout must be a number of seconds, not NaN",
                                  hint="pass a number of seconds, or None for the client's default")
        return min(max(0.0, seconds), MAX_WAIT_S)

    def set(self, key: str, value: bytes) -> None:
        """Store bytes under `key`."""
        self._request({"op": "set", "key": key}, bytes(value))

    def get(self, key: str, timeout: float | None = None) -> bytes:
        """The bytes under `key`, waiting up to `timeout` s (default: the client's) for it to be set."""
        t = self._timeout(timeout)
        return self._request({"op": "get", "key": key, "timeout": t}, wait=t)[1] or b""

    def check(self, keys: Iterable[str]) -> bool:
        """Whether all `keys` exist, without waiting."""
        return bool(self._request({"op": "check", "keys": _key_list(keys)})[0]["value"])

    def add(self, key: str, amount: int = 1) -> int:
        """Atomically add `amount` to the counter under `key` (0 if absent); returns the new value."""
        return int(self._request({"op": "add", "key": key, "amount": amount})[0]["value"])

    def wait(self, keys: Iterable[str], timeout: float | None = None) -> None:
        """Block until all `keys` exist; RendezvousError naming the missing ones on timeout."""
        t = self._timeout(timeout)
        self._request({"op": "wait", "keys": _key_list(keys), "timeout": t}, wait=t)

    def delete(self, key: str) -> bool:
        """Remove `key`; returns whether it existed."""
        return bool(self._request({"op": "delete", "key": key})[0]["value"])

    def barrier(self, name: str, world_size: int, timeout: float | None = None) -> None:
        """Return once `world_size` callers reached barrier `name`; the name is reusable round after round."""
        t = self._timeout(timeout)
        self._request({"op": "barrier", "name": name, "world_size": world_size, "timeout": t}, wait=t)

    def heartbeat(self, rank: int, progress: dict[str, Any] | None = None) -> dict[str, Any]:
        """Tell the server that `rank` is alive (it stamps its own clock), with its progress report if
        given; returns what the launcher asks of the ranks (e.g. {"stop": True}), usually {}."""
        header: dict[str, Any] = {"op": "heartbeat", "rank": rank}
        if progress is not None:
            header["progress"] = progress
        control = self._request(header)[0].get("control")
        return control if isinstance(control, dict) else {}

    def set_json(self, key: str, obj: Any) -> None:
        self.set(key, json.dumps(obj).encode())

    def get_json(self, key: str, timeout: float | None = None) -> Any:
        return json.loads(self.get(key, timeout))

    def close(self) -> None:
        """Close the connection (idempotent); a thread blocked in a request gets RendezvousError."""
        self._closed = True
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv; it then closes the socket
            except OSError:
                pass
            if self._lock.acquire(blocking=False):
                try:
                    sock.close()
                    self._sock = None
                finally:
                    self._lock.release()

    def __enter__(self) -> StoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed or self._sock is None else "connected"
        return f"StoreClient({self.address}, {state})"


def _key_list(keys: Iterable[str]) -> list[str]:
    return [keys] if isinstance(keys, str) else list(keys)  # "a" means one key, not three


def _reach_hint(port: int) -> str:
    return (f"the launcher on the master must be running; check that MASTER_ADDR is an address of the master "
            f"that this host can reach and that no firewall blocks port {port}")
