"""The rendezvous store under abuse, over real sockets: connection floods, descriptor exhaustion, log floods,
hostile numbers and nesting in requests, and announced lengths that never arrive."""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from distributed.errors import RendezvousError
from distributed.store import HEADER_LIMIT, VALUE_LIMIT, FrameError, StoreClient, new_secret, recv_frame, send_frame
from distributed.store_guard import LogLimiter
from distributed.store_ops import MAX_DEPTH
from distributed.store_server import StoreServer
from tests.integration.test_store import LogSink, assert_disconnected, until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]
ROOT = Path(__file__).resolve().parents[2]
SECRET = new_secret()
BOUND_S = 20.0  # how long to poll for what takes milliseconds on an idle machine


@pytest.fixture
def logs() -> LogSink:
    return LogSink()


@pytest.fixture
def make_server(logs: LogSink) -> Iterator[Callable[..., StoreServer]]:
    made: list[StoreServer] = []

    def make(**kw: object) -> StoreServer:
        srv = StoreServer("127.0.0.1", 0, SECRET, on_log=logs, **kw)  # type: ignore[arg-type]
        srv.start()
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.close()


@pytest.fixture
def served(make_server: Callable[..., StoreServer]) -> StoreServer:
    return make_server()


@pytest.fixture
def connect(served: StoreServer) -> Iterator[Callable[..., StoreClient]]:
    made: list[StoreClient] = []

    def make(**kw: object) -> StoreClient:
        client = StoreClient("127.0.0.1", served.port, SECRET, **{"timeout": 10.0, **kw})  # type: ignore[arg-type]
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@contextmanager
def thread_crashes() -> Iterator[list[str]]:
    """Collects exceptions that end threads (the tracebacks that would otherwise go to stderr)."""
    crashes: list[str] = []
    old = threading.excepthook
    threading.excepthook = lambda a: crashes.append(f"{a.thread.name if a.thread else '?'}: {a.exc_value!r}")
    try:
        yield crashes
    finally:
        threading.excepthook = old


def greeted(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A connection that got the server's greeting, so the server has admitted it, and then says nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=BOUND_S, source_address=(source, 0))
    recv_frame(sock, 256, deadline=None)
    return sock


def closed_at_once(sock: socket.socket) -> bool:
    """Whether the server closed `sock` without a greeting (EOF or reset before any byte)."""
    sock.settimeout(BOUND_S)
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


# --- caps on unauthenticated connections ----------------------------------------------------------------


def test_unauthenticated_connections_over_the_per_address_cap_are_closed_at_once(
        make_server: Callable[..., StoreServer], logs: LogSink) -> None:
    srv = make_server(handshake_timeout=60.0, max_pending=10, max_pending_per_peer=2)
    held = [greeted(srv.port), greeted(srv.port)]
    extra = socket.create_connection(("127.0.0.1", srv.port), timeout=BOUND_S)
    port = extra.getsockname()[1]
    assert closed_at_once(extra), "a third silent connection from one address got a greeting"
    assert logs.wait_for(f"refused 127.0.0.1:{port} ").endswith(
        "(2 unauthenticated connections from 127.0.0.1 already, the most allowed per address)")
    assert srv.refused == 1 and srv.pending == 2
    try:  # another address is not held back by this one's cap (Linux routes all of 127/8 to loopback)
        other = greeted(srv.port, source="127.0.0.2")
    except OSError:
        other = None  # macOS has only 127.0.0.1 unless an alias is configured
    if other is not None:
        other.close()
    held.pop().close()  # a slot frees as soon as its peer goes ...
    until(lambda: srv.pending == 1, BOUND_S, "the closed peer's slot to free")
    with StoreClient("127.0.0.1", srv.port, SECRET, timeout=10) as good:  # ... and a rank takes it
        good.set("k", b"v")
        assert good.get("k") == b"v"
    for sock in held:
        sock.close()


def test_unauthenticated_connections_over_the_total_cap_are_closed_and_silent_ones_time_out(
        make_server: Callable[..., StoreServer], logs: LogSink) -> None:
    srv = make_server(handshake_timeout=3.0, max_pending=3, max_pending_per_peer=3)
    held = [greeted(srv.port) for _ in range(3)]
    assert closed_at_once(socket.create_connection(("127.0.0.1", srv.port), timeout=BOUND_S))
    logs.wait_for("(3 unauthenticated connections already, the most allowed)")
    # The silent ones are dropped after the handshake timeout, which frees every slot.
    for sock in held:
        assert_disconnected(sock)
    until(lambda: srv.pending == 0, BOUND_S, "slots to free")
    assert len([ln for ln in logs.lines if "(no proof within 3 s)" in ln]) == 3
    with StoreClient("127.0.0.1", srv.port, SECRET, timeout=10) as good:
        assert good.add("n") == 1


# --- descriptor exhaustion ------------------------------------------------------------------------------

EXHAUSTED_SERVER = """
import json, resource, sys, threading, time
from distributed.store_server import StoreServer

resource.setrlimit(resource.RLIMIT_NOFILE, (48, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
failed = threading.Event()
def log(line):
    if "cannot accept" in line:
        failed.set()
srv = StoreServer("127.0.0.1", 0, sys.argv[1], on_log=log, handshake_timeout=120,
                  max_pending=10000, max_pending_per_peer=10000)  # no caps: let descriptors run out
srv.start()
print(srv.port, flush=True)
saw = failed.wait(20)  # the parent's flood uses up the descriptors
cpu, wall = time.process_time(), time.monotonic()
time.sleep(2.0)  # the measurement window, not a synchronisation
cpu, wall = time.process_time() - cpu, time.monotonic() - wall
print(json.dumps({"saw": saw, "cpu": cpu, "wall": wall}), flush=True)
sys.stdin.readline()
srv.close()
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs the resource module (POSIX)")
def test_out_of_descriptors_the_accept_loop_pauses_instead_of_spinning() -> None:
    proc = subprocess.Popen([sys.executable, "-c", EXHAUSTED_SERVER, SECRET], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    flood: list[socket.socket] = []
    try:
        assert proc.stdout is not None and proc.stdin is not None
        port = int(proc.stdout.readline())
        # 80 idle connections against 48 descriptors: the server accepts ~40, the rest wait in the backlog.
        flood = [socket.create_connection(("127.0.0.1", port), timeout=BOUND_S) for _ in range(80)]
        measured = json.loads(proc.stdout.readline())
        share = measured["cpu"] / measured["wall"]
        assert share < 0.15, f"the server burnt {share:.0%} of a core while out of descriptors"
        assert measured["saw"], "the server never logged that accept() failed"
        for sock in flood:
            sock.close()  # their descriptors come back on the server's side ...
        with StoreClient("127.0.0.1", port, SECRET, timeout=10, connect_timeout=BOUND_S) as good:
            good.set("k", b"v")  # ... and a rank is served again
            assert good.get("k") == b"v"
        proc.stdin.write("done\n")
        proc.stdin.flush()
        assert proc.wait(BOUND_S) == 0
    finally:
        for sock in flood:
            sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- log rate limit -------------------------------------------------------------------------------------


def test_refusals_log_a_burst_per_address_then_count_the_rest(make_server: Callable[..., StoreServer],
                                                             logs: LogSink) -> None:
    srv = make_server(log_burst=3, log_interval=3600.0)
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=BOUND_S)
        sock.sendall(struct.pack(">I", 0xFFFFFFFF))  # an oversized handshake: refused at once
        assert_disconnected(sock)
    until(lambda: srv.refused == 20, BOUND_S, "all 20 refusals")
    assert len([ln for ln in logs.lines if "refused" in ln]) == 3  # the rest were counted, not printed
    with StoreClient("127.0.0.1", srv.port, SECRET, timeout=10) as good:
        assert good.add("n") == 1  # and the store still serves


def test_log_limiter_carries_the_count_into_the_next_window() -> None:
    now = [0.0]
    lines: list[str] = []
    limit = LogLimiter(lines.append, burst=2, interval=10.0, clock=lambda: now[0])
    sent = [limit("10.0.0.5", f"refused 10.0.0.5:{port} (bad proof)") for port in range(40)]
    assert sent == [True, True] + [False] * 38
    assert limit("10.0.0.6", "refused 10.0.0.6:1 (bad proof)")  # addresses are limited apart
    now[0] = 9.9
    assert not limit("10.0.0.5", "refused 10.0.0.5:99 (bad proof)")
    now[0] = 10.0
    assert limit("10.0.0.5", "refused 10.0.0.5:100 (bad proof)")
    assert lines == ["refused 10.0.0.5:0 (bad proof)", "refused 10.0.0.5:1 (bad proof)",
                     "refused 10.0.0.6:1 (bad proof)",
                     "refused 10.0.0.5:100 (bad proof) (and 39 more from 10.0.0.5)"]
    assert limit("10.0.0.5", "refused 10.0.0.5:101 (bad proof)")
    assert lines[-1] == "refused 10.0.0.5:101 (bad proof)"  # the count went out once


# --- hostile numbers and nesting from an authenticated client ------------------------------------------


def test_nan_negative_and_non_number_timeouts_are_refused_and_the_connection_goes_on(connect) -> None:
    c = connect(timeout=5.0)  # a server stuck on a request would show as "lost the rendezvous" after 5 s
    with thread_crashes() as crashes:
        for op in ("get", "wait", "barrier"):
            for bad in (float("nan"), -1, "soon", None, True):
                header = {"op": op, "key": "missing", "keys": ["missing"], "name": "b", "world_size": 2,
                          "timeout": bad}
                with pytest.raises(RendezvousError, match=r"'timeout' must be a number of seconds >= 0, not NaN"):
                    c._request(header)
        c.set("k", b"v")  # still in step
        assert c.get("k") == b"v"
        with pytest.raises(RendezvousError, match="not NaN"):
            c.get("k", timeout=float("nan"))  # the client refuses it before sending
    assert crashes == []


@pytest.mark.parametrize("huge", [math.inf, 1e300, 10**400], ids=["inf", "1e300", "10**400"])
def test_infinite_and_huge_timeouts_are_clamped_and_still_wait(connect, served: StoreServer, huge: float) -> None:
    waiter = connect()
    with thread_crashes() as crashes:
        out: dict[str, object] = {}

        def wait() -> None:
            try:
                out["raw"] = waiter._request({"op": "get", "key": "late", "timeout": huge})[1]
                out["api"] = waiter.get("late", timeout=huge)  # the client clamps it the same way
            except RendezvousError as e:
                out["error"] = e

        thread = threading.Thread(target=wait, daemon=True)
        thread.start()
        thread.join(0.3)
        assert thread.is_alive(), f"the get returned before the key was set: {out}"
        served.set("late", b"here")
        thread.join(BOUND_S)
        assert out == {"raw": b"here", "api": b"here"}
    assert crashes == []


def test_a_duration_too_large_for_a_float_in_a_heartbeat_is_refused(connect, served: StoreServer) -> None:
    c = connect()
    with thread_crashes() as crashes:
        for step_s in (10**400, 1e300, math.inf):
            with pytest.raises(RendezvousError, match="heartbeat progress must be"):
                c.heartbeat(0, {"step": 1, "collectives": 0, "doing": "", "step_s": step_s})
        c.heartbeat(0, {"step": 1, "collectives": 0, "doing": "", "step_s": 0.5})
    assert served.progress_report()[0]["step_s"] == 0.5
    assert crashes == []


def test_deeply_nested_header_gets_an_error_reply_and_the_store_goes_on(connect, logs: LogSink) -> None:
    c = connect()
    with thread_crashes() as crashes:
        # Up to MAX_DEPTH levels is parsed (then refused as a bad request, the connection stays) ...
        keys = "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)
        with pytest.raises(RendezvousError, match="'keys' must be a list of strings"):
            c._request({"op": "check", "keys": json.loads(keys)})
        c.set("[" * 5000 + "{", b"v")  # brackets inside strings do not count
        assert c.get("[" * 5000 + "{") == b"v"
        # ... one level more is refused unparsed: a reply says why, then the connection closes.
        for depth in (30000, MAX_DEPTH):  # the header object is one level more
            victim = connect()
            assert victim._sock is not None
            port = victim._sock.getsockname()[1]
            header = b'{"op": "check", "keys": ' + b"[" * depth + b"]" * depth + b"}"
            assert len(header) <= HEADER_LIMIT
            send_frame(victim._sock, header)
            reply = json.loads(recv_frame(victim._sock, HEADER_LIMIT, deadline=None))
            assert reply == {"ok": False, "error": "bad_header",
                             "message": f"request header is nested deeper than {MAX_DEPTH} levels"}
            assert logs.wait_for(f"dropped 127.0.0.1:{port} ").endswith(f"nested deeper than {MAX_DEPTH} levels)")
            assert_disconnected(victim._sock)
        assert connect().check(["[" * 5000 + "{"])  # everyone else is served
    assert crashes == []


# --- announced lengths ----------------------------------------------------------------------------------


def test_an_announced_length_is_not_allocated_before_its_bytes_arrive() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack(">I", VALUE_LIMIT))  # 64 MiB announced, nothing sent
        tracemalloc.start()
        try:
            with pytest.raises(FrameError) as info:
                recv_frame(b, VALUE_LIMIT, deadline=time.monotonic() + 0.2)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert info.value.kind == "timeout"
    assert peak < 1 << 20, f"{peak} bytes allocated for a frame that never came"


def test_server_memory_follows_the_bytes_of_a_value_not_its_announced_length(connect, served: StoreServer) -> None:
    c = connect()
    assert c._sock is not None
    sent = bytes(2 << 20)  # made before tracing, so only the server's buffers are traced
    tracemalloc.start()
    try:
        send_frame(c._sock, json.dumps({"op": "set", "key": "big", "body": True}).encode())
        c._sock.sendall(struct.pack(">I", VALUE_LIMIT) + sent)  # 64 MiB announced, 2 MiB sent
        until(lambda: tracemalloc.get_traced_memory()[0] >= len(sent), BOUND_S, "the server to buffer 2 MiB")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"the server allocated {peak >> 20} MiB for 2 MiB received"
    c.close()
    with StoreClient("127.0.0.1", served.port, SECRET, timeout=10) as good:
        assert good.check(["big"]) is False  # the half-sent value was never stored
