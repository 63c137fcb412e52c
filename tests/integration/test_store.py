"""The rendezvous store over real sockets on 127.0.0.1: ops, blocking, auth, hostile peers, processes."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from distributed import store
from distributed.env import RankEnv
from distributed.errors import RendezvousError
from distributed.heartbeat import start_heartbeat
from distributed.store import (
    MAGIC,
    NONCE_BYTES,
    StoreClient,
    new_secret,
    recv_frame,
    send_frame,
)
from distributed.store_server import StoreServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
ROOT = Path(__file__).resolve().parents[2]
HANDSHAKE_S = 0.5


class LogSink:
    """Collects the server's log lines; lets a test wait for one without sleeping blindly."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()

    def __call__(self, line: str) -> None:
        with self._cond:
            self.lines.append(line)
            self._cond.notify_all()

    def wait_for(self, needle: str, timeout: float = 5.0) -> str:
        with self._cond:
            found = self._cond.wait_for(lambda: any(needle in ln for ln in self.lines), timeout)
            assert found, f"no log line containing {needle!r} in {self.lines}"
            return next(ln for ln in self.lines if needle in ln)


def until(condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        threading.Event().wait(0.01)


@pytest.fixture
def secret() -> str:
    return new_secret()


@pytest.fixture
def logs() -> LogSink:
    return LogSink()


@pytest.fixture
def server(secret: str, logs: LogSink) -> Iterator[StoreServer]:
    with StoreServer("127.0.0.1", 0, secret=secret, on_log=logs, handshake_timeout=HANDSHAKE_S) as srv:
        yield srv


@pytest.fixture
def connect(server: StoreServer, secret: str) -> Iterator[Callable[..., StoreClient]]:
    made: list[StoreClient] = []

    def make(**kw: object) -> StoreClient:
        client = StoreClient("127.0.0.1", server.port, secret, **{"timeout": 10.0, **kw})
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def run_in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    """Run fn in a thread; its result or exception lands in the returned dict."""
    out: dict[str, object] = {}

    def body() -> None:
        try:
            out["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            out["error"] = e

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


def assert_disconnected(sock: socket.socket) -> None:
    """The server has closed `sock`: reads end in EOF (or a reset, if our unread bytes were discarded)."""
    sock.settimeout(5)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    finally:
        sock.close()


# --- ops ------------------------------------------------------------------------------------------------


def test_set_get_bytes_json_and_a_10mb_value(connect) -> None:
    a, b = connect(), connect()
    a.set("raw", b"\x00\xffbytes\n")
    assert b.get("raw") == b"\x00\xffbytes\n"
    a.set_json("cfg", {"hosts": ["m1", "m2"], "port": 5000, "ok": True})
    assert b.get_json("cfg") == {"hosts": ["m1", "m2"], "port": 5000, "ok": True}
    big = os.urandom(10 * 1024 * 1024)
    a.set("big", big)
    assert b.get("big") == big
    a.set("raw", b"v2")  # overwrite
    assert b.get("raw") == b"v2"


def test_check_delete_and_wait(connect, server: StoreServer) -> None:
    c = connect()
    c.set("a", b"1")
    assert c.check(["a"]) is True
    assert c.check(["a", "b"]) is False
    assert c.check("a") is True  # a bare string is one key
    waiter = connect()
    thread, out = run_in_thread(lambda: waiter.wait(["a", "b"], timeout=10))
    server.set("b", b"2")  # the launcher's direct write wakes a remote waiter
    thread.join(5)
    assert not thread.is_alive() and "error" not in out
    assert c.delete("a") is True
    assert c.delete("a") is False
    assert c.check(["a"]) is False
    with pytest.raises(RendezvousError, match=r"\['a'\] did not appear within 0.2 s"):
        c.wait(["a", "b"], timeout=0.2)


def test_server_side_access_for_the_launcher(connect, server: StoreServer) -> None:
    c = connect()
    c.set_json("rank/0", {"ip": "10.0.0.1"})
    assert server.get_json_nowait("rank/0") == {"ip": "10.0.0.1"}
    assert server.get_nowait("absent") is None
    server.set_json("plan", [1, 2])
    assert c.get_json("plan") == [1, 2]
    assert server.add("n", 5) == 5
    assert c.add("n", 2) == 7


def test_get_blocks_until_another_thread_sets_the_key(connect) -> None:
    reader, writer = connect(), connect()
    thread, out = run_in_thread(lambda: reader.get("late", timeout=10))
    thread.join(0.3)
    assert thread.is_alive(), f"get returned before the key was set: {out}"
    writer.set("late", b"here")
    thread.join(5)
    assert out == {"result": b"here"}


def test_get_timeout_names_the_key(connect) -> None:
    c = connect()
    started = time.monotonic()
    with pytest.raises(RendezvousError) as info:
        c.get("rank/3/addr", timeout=0.3)
    assert "'rank/3/addr' did not appear within 0.3 s" in str(info.value)
    assert f"127.0.0.1:{c.port}" in str(info.value)
    assert info.value.hint
    assert 0.25 < time.monotonic() - started < 5
    c.set("after", b"1")  # a timeout leaves the connection usable
    assert c.get("after") == b"1"


def test_add_is_atomic_under_8_threads(connect) -> None:
    clients = [connect() for _ in range(8)]
    results: list[list[int]] = [[] for _ in clients]

    def hammer(i: int) -> None:
        for _ in range(100):
            results[i].append(clients[i].add("counter", 1))

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    returned = sorted(v for r in results for v in r)
    assert returned == list(range(1, 801))  # every add saw a distinct value: none was lost
    assert clients[0].get("counter") == b"800"
    assert clients[0].add("counter", -800) == 0


def test_add_on_a_non_counter_is_an_error(connect) -> None:
    c = connect()
    c.set("text", b"hello")
    with pytest.raises(RendezvousError, match="'text' holds a value that is not a counter"):
        c.add("text", 1)


def test_barrier_releases_only_when_all_arrived_and_is_reusable(connect) -> None:
    n, rounds = 4, 3
    clients = [connect() for _ in range(n)]
    lock = threading.Lock()
    arrived = [0] * rounds
    seen: list[list[int]] = [[] for _ in range(rounds)]

    def rank(i: int) -> None:
        for r in range(rounds):
            with lock:
                arrived[r] += 1
            clients[i].barrier("step", n, timeout=10)
            with lock:
                seen[r].append(arrived[r])

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == [[n] * n] * rounds  # nobody left a round before all four had entered it


def test_barrier_times_out_with_the_count_and_recovers(connect) -> None:
    clients = [connect() for _ in range(4)]
    started = [run_in_thread(lambda c=c: c.barrier("b", 4, timeout=0.5)) for c in clients[:3]]
    errors = []
    for thread, out in started:
        thread.join(10)
        errors.append(out.get("error"))
    assert all(isinstance(e, RendezvousError) for e in errors)
    assert any("'b' timed out after 0.5 s with 3 of 4 ranks arrived" in str(e) for e in errors)
    # The timed-out arrivals were withdrawn: a full round still needs all four.
    full = [run_in_thread(lambda c=c: c.barrier("b", 4, timeout=10)) for c in clients]
    for thread, out in full:
        thread.join(10)
        assert out == {"result": None}


# --- heartbeats -----------------------------------------------------------------------------------------


def test_heartbeat_ages_use_the_servers_clock(connect, server: StoreServer) -> None:
    c = connect()
    assert server.heartbeat_ages() == {}
    before = time.monotonic()
    c.heartbeat(3)
    ages = server.heartbeat_ages()
    assert set(ages) == {3}  # ranks that never beat are absent
    assert 0 <= ages[3] <= time.monotonic() - before
    until(lambda: server.heartbeat_ages()[3] >= 0.2, what="age to grow")
    c.heartbeat(3)
    assert server.heartbeat_ages()[3] < 0.2


def test_start_heartbeat_beats_on_its_own_connection_until_stopped(connect, server: StoreServer) -> None:
    c = connect()
    stop = start_heartbeat(c, 1, interval=0.05)
    assert 1 in server.heartbeat_ages()  # the first beat is sent before start_heartbeat returns
    # While the rank's main connection is stuck in a long get, the beats keep coming.
    thread, _ = run_in_thread(lambda: c.get("never", timeout=1.0))
    worst = 0.0
    while thread.is_alive():
        worst = max(worst, server.heartbeat_ages()[1])
        thread.join(0.02)
    assert worst < 0.5, f"heartbeat stalled for {worst:.2f} s"
    stop.set()
    until(lambda: server.heartbeat_ages()[1] > 0.5, what="heartbeats to stop")


# --- authentication and hostile peers -------------------------------------------------------------------


def test_wrong_secret_is_refused_and_logged(server: StoreServer, logs: LogSink, secret: str) -> None:
    wrong = new_secret()
    with pytest.raises(RendezvousError) as info:
        StoreClient("127.0.0.1", server.port, wrong, timeout=5)
    assert str(info.value) == f"rendezvous at 127.0.0.1:{server.port} refused our proof: wrong secret"
    assert "MACRUN_SECRET" in (info.value.hint or "")
    assert server.refused == 1
    line = logs.wait_for("refused")
    assert line.startswith("rendezvous: refused 127.0.0.1:") and line.endswith("(bad proof)")
    for text in (str(info.value), info.value.hint or "", line):
        assert secret not in text and wrong not in text


def _raw(port: int) -> tuple[socket.socket, int]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock, sock.getsockname()[1]


def test_hostile_peers_are_refused_while_a_good_client_works(connect, server: StoreServer,
                                                            logs: LogSink) -> None:
    good = connect()
    garbage, garbage_port = _raw(server.port)
    garbage.sendall(os.urandom(1000))
    silent, silent_port = _raw(server.port)
    huge, huge_port = _raw(server.port)
    huge.sendall(struct.pack(">I", 0xFFFFFFFF))
    forged, forged_port = _raw(server.port)
    recv_frame(forged, 256)  # the greeting; answer it with a well-formed but forged proof
    send_frame(forged, os.urandom(2 * NONCE_BYTES))

    good.set("k", b"v")  # served while the bad peers are still connected
    assert good.get("k") == b"v"

    expected = [(garbage_port, "(malformed handshake)"), (huge_port, "(malformed handshake)"),
                (silent_port, f"(no proof within {HANDSHAKE_S:g} s)"), (forged_port, "(bad proof)")]
    for port, reason in expected:
        assert logs.wait_for(f"refused 127.0.0.1:{port} ").endswith(reason)
    assert server.refused == 4
    assert len([ln for ln in logs.lines if "refused" in ln]) == 4  # one line per connection
    for sock in (garbage, silent, huge, forged):
        assert_disconnected(sock)
    good.set("k", b"still fine")
    assert connect().get("k") == b"still fine"


def test_a_trickling_peer_cannot_stretch_the_handshake_deadline(server: StoreServer, logs: LogSink) -> None:
    sock, port = _raw(server.port)
    recv_frame(sock, 256)
    stop = threading.Event()

    def trickle() -> None:  # a byte every 0.1 s: each recv succeeds, the whole answer never does
        sock.sendall(struct.pack(">I", 2 * NONCE_BYTES))
        try:
            while not stop.wait(0.1):
                sock.sendall(b"x")
        except OSError:
            pass

    thread = threading.Thread(target=trickle, daemon=True)
    started = time.monotonic()
    thread.start()
    line = logs.wait_for(f"refused 127.0.0.1:{port} ")
    assert line.endswith(f"(no proof within {HANDSHAKE_S:g} s)")
    assert time.monotonic() - started < 2.0
    stop.set()
    thread.join(5)
    assert_disconnected(sock)


def test_authenticated_peer_sending_bad_frames_is_dropped(connect, logs: LogSink) -> None:
    for payload, reason in [(struct.pack(">I", 9) + b"{not json", "(bad request header)"),
                            (struct.pack(">I", 0x7FFFFFFF), "over the 65536-byte limit")]:
        c = connect()
        assert c._sock is not None
        port = c._sock.getsockname()[1]
        c._sock.sendall(payload)
        assert reason in logs.wait_for(f"dropped 127.0.0.1:{port} ")
        with pytest.raises(RendezvousError, match="lost the rendezvous"):
            c.get("x", timeout=1)


def test_client_refuses_an_impostor_server(secret: str) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def impostor() -> None:
        conn, _ = listener.accept()
        with conn:
            send_frame(conn, MAGIC + os.urandom(NONCE_BYTES))
            recv_frame(conn, 256)
            send_frame(conn, b"\x01" + os.urandom(32))  # claims acceptance without knowing the secret
            conn.recv(1)

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    with pytest.raises(RendezvousError, match="could not prove it knows this run's secret") as info:
        StoreClient("127.0.0.1", port, secret, timeout=5)
    assert secret not in str(info.value)
    thread.join(5)
    listener.close()


def test_unreachable_store_names_the_address() -> None:
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    started = time.monotonic()
    with pytest.raises(RendezvousError) as info:
        StoreClient("127.0.0.1", port, new_secret(), connect_timeout=0.3)
    assert f"cannot reach the rendezvous at 127.0.0.1:{port}" in str(info.value)
    assert str(port) in (info.value.hint or "")
    assert time.monotonic() - started < 5


def test_value_over_the_limit_is_refused_before_sending(connect, monkeypatch) -> None:
    c = connect()
    monkeypatch.setattr(store, "VALUE_LIMIT", 1000)
    with pytest.raises(RendezvousError, match="'blob' is 1001 bytes, over the"):
        c.set("blob", b"x" * 1001)
    c.set("small", b"x" * 1000)  # the connection is still in step
    assert c.get("small") == b"x" * 1000


# --- shutdown and secrecy -------------------------------------------------------------------------------


def test_close_wakes_blocked_clients(connect, server: StoreServer) -> None:
    getter, waiter = connect(timeout=30.0), connect(timeout=30.0)
    blocked = [run_in_thread(lambda: getter.get("never", timeout=30)),
               run_in_thread(lambda: waiter.barrier("never", 2, timeout=30))]
    for thread, _ in blocked:
        thread.join(0.3)
        assert thread.is_alive()
    started = time.monotonic()
    server.close()
    server.close()  # idempotent
    for thread, out in blocked:
        thread.join(5)
        assert isinstance(out.get("error"), RendezvousError)
        assert f"127.0.0.1:{server.port}" in str(out["error"])
    assert time.monotonic() - started < 5
    with pytest.raises(RendezvousError, match="cannot reach"):
        StoreClient("127.0.0.1", server.port, "s", connect_timeout=0.2)


def test_client_close_wakes_its_own_blocked_request(connect) -> None:
    c = connect()
    thread, out = run_in_thread(lambda: c.get("never", timeout=30))
    thread.join(0.3)
    c.close()
    thread.join(5)
    assert isinstance(out.get("error"), RendezvousError)
    assert "closed" in str(out["error"])
    assert "closed" in repr(c)


def test_the_secret_never_shows(connect, server: StoreServer, logs: LogSink, secret: str) -> None:
    c = connect()
    texts = [repr(c), str(c), repr(server), str(server)]
    with pytest.raises(RendezvousError) as timeout_error:
        c.get("nope", timeout=0.05)
    with pytest.raises(RendezvousError) as wrong_error:
        StoreClient("127.0.0.1", server.port, secret[::-1], timeout=5)
    logs.wait_for("bad proof")
    server.close()
    with pytest.raises(RendezvousError) as lost_error:
        c.get("nope", timeout=5)
    for err in (timeout_error.value, wrong_error.value, lost_error.value):
        texts += [str(err), repr(err), err.hint or ""]
    texts += logs.lines
    assert all(secret not in t and secret[::-1] not in t for t in texts), texts


def test_from_env_prefers_the_store_address_and_port(server: StoreServer, secret: str) -> None:
    base = dict(rank=0, world_size=1, local_rank=0, local_world_size=1, master_port=1, run_id="r1",
                secret=secret, store_port=server.port)
    for env in (RankEnv(master_addr="127.0.0.1", **base),  # no store_addr: MASTER_ADDR is the store's host
                RankEnv(master_addr="192.0.2.1", store_addr="127.0.0.1", **base)):  # TEST-NET, never dialled
        with StoreClient.from_env(env, timeout=5) as c:
            c.add("hello", 1)
    assert server.get_nowait("hello") == b"2"


def test_server_takes_the_secret_positionally_and_refuses_an_empty_one(secret: str) -> None:
    with StoreServer("127.0.0.1", 0, secret) as srv, StoreClient("127.0.0.1", srv.port, secret) as c:
        c.set("k", b"v")
    with pytest.raises(RendezvousError, match="secret is empty"):
        StoreServer("127.0.0.1", 0)


# --- separate processes ---------------------------------------------------------------------------------

RANK_SNIPPET = """
import os
from distributed.env import RankEnv
from distributed.store import StoreClient
env = RankEnv.from_environ()
with StoreClient.from_env(env, timeout=20) as c:
    c.barrier("start", env.world_size)
    n = c.add("count", 1)
    c.set_json(f"rank/{env.rank}", {"pid": os.getpid(), "n": n})
    c.barrier("end", env.world_size)
    print(c.get("count").decode(), n)
"""


def test_four_processes_meet_at_a_barrier_and_count(server: StoreServer, secret: str) -> None:
    world = 4
    procs = []
    for rank in range(world):
        env = RankEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world,
                      master_addr="127.0.0.1", master_port=1, run_id="proc-test", secret=secret,
                      store_port=server.port)
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SNIPPET], cwd=ROOT, text=True,
                                      env={**os.environ, **env.to_environ()},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = [p.communicate(timeout=40) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    totals, ns = zip(*(out.split() for out, _ in outputs), strict=True)
    assert totals == ("4",) * world  # after the second barrier every rank sees all four adds
    assert sorted(int(n) for n in ns) == [1, 2, 3, 4]
    pids = {json.loads(server.get_nowait(f"rank/{r}") or b"null")["pid"] for r in range(world)}
    assert pids == {p.pid for p in procs}
    assert server.refused == 0
