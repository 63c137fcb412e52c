"""Heartbeats against a real store server: progress reaches the watchdog, requests reach the ranks, and a rank
that loses the launcher finds out within its launcher timeout."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from distributed.errors import RendezvousError
from distributed.heartbeat import start_heartbeat
from distributed.progress import Progress
from distributed.store import StoreClient
from distributed.store_server import StoreServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
SECRET = "s" * 64
INTERVAL = 0.2
LAUNCHER_TIMEOUT = 1.0
BOUND_S = 20.0  # how long to poll for something that takes well under a second on an idle machine


def poll(what: Callable[[], Any], timeout: float = BOUND_S) -> Any:
    """The first truthy value of `what()`, polled every 10 ms for at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {what}")
        time.sleep(0.01)


@pytest.fixture
def server() -> Iterator[StoreServer]:
    logs: list[str] = []
    srv = StoreServer("127.0.0.1", 0, SECRET, on_log=logs.append)
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def client(server: StoreServer) -> Iterator[StoreClient]:
    with StoreClient("127.0.0.1", server.port, SECRET, timeout=10) as c:
        yield c


class Lost:
    """An on_lost that records its calls instead of ending the test process."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float]] = []  # (silence reported, monotonic time of the call)
        self.called = threading.Event()

    def __call__(self, silent: float) -> None:
        self.calls.append((silent, time.monotonic()))
        self.called.set()


def heartbeat_thread(rank: int) -> threading.Thread | None:
    return next((t for t in threading.enumerate() if t.name == f"rendezvous-heartbeat-{rank}"), None)


def stalled_across_beats(server: StoreServer, rank: int, margin: float) -> dict[str, Any] | None:
    """The rank's report once its stall exceeds the age of its latest beat by `margin` s, else None."""
    report, age = server.progress_report()[rank], server.heartbeat_ages()[rank]
    return report if report["stalled"] > age + margin else None


def test_progress_reaches_the_report_and_stalls_until_the_step_moves(server: StoreServer,
                                                                     client: StoreClient) -> None:
    progress = Progress()
    lost = Lost()
    stop = start_heartbeat(client, 3, INTERVAL, progress=progress, launcher_timeout=LAUNCHER_TIMEOUT, on_lost=lost)
    try:
        assert 3 in server.heartbeat_ages()  # the first beat went before start_heartbeat returned
        assert server.progress_report() == {}  # not training yet: beats carry no report

        progress.start(0)
        progress.enter("gradient all_sum of step 1")
        first = poll(lambda: server.progress_report().get(3))
        assert first["step"] == 0 and first["doing"] == "gradient all_sum of step 1" and first["collectives"] == 1
        # The step does not move: "stalled" counts from the first report, across later beats (it exceeds the
        # time since the latest beat by several intervals, so beats with the same step did not reset it).
        later = poll(lambda: stalled_across_beats(server, 3, 3 * INTERVAL))
        assert later["step"] == 0 and later["stalled"] > first["stalled"]

        progress.finished(1)
        moved = poll(lambda: (r := server.progress_report()[3])["step"] == 1 and r)
        assert moved["stalled"] < later["stalled"]  # reset when the step changed
        assert moved["doing"] == "step 2" and moved["step_s"] is not None and moved["step_s"] > 0
        again = poll(lambda: stalled_across_beats(server, 3, 2 * INTERVAL))
        assert again["step"] == 1
    finally:
        stop.set()
    assert lost.calls == []


def test_a_launcher_request_reaches_progress_control(server: StoreServer, client: StoreClient) -> None:
    progress = Progress()
    progress.start(0)
    stop = start_heartbeat(client, 0, INTERVAL, progress=progress, launcher_timeout=LAUNCHER_TIMEOUT, on_lost=Lost())
    try:
        assert not progress.stop_requested
        server.request(stop=True)
        poll(lambda: progress.stop_requested)
        assert progress.control == {"stop": True}
        assert client.heartbeat(0) == {"stop": True}  # every rank's reply carries it
    finally:
        stop.set()


def test_losing_the_launcher_calls_on_lost_once(server: StoreServer, client: StoreClient) -> None:
    progress = Progress()
    progress.start(0)
    lost = Lost()
    start_heartbeat(client, 7, INTERVAL, progress=progress, launcher_timeout=LAUNCHER_TIMEOUT, on_lost=lost)
    poll(lambda: 7 in server.progress_report())
    closed = time.monotonic()
    server.close()
    assert lost.called.wait(BOUND_S), "on_lost was never called"
    thread = heartbeat_thread(7)
    if thread is not None:
        thread.join(BOUND_S)
        assert not thread.is_alive(), "the heartbeat thread goes on after giving up"
    assert len(lost.calls) == 1
    silent, at = lost.calls[0]
    assert silent >= LAUNCHER_TIMEOUT
    # Each retry may spend up to its request timeout (1 s here) failing to reconnect, so the call comes
    # within launcher_timeout + interval + one retry; the bound leaves room for a busy machine.
    assert at - closed >= LAUNCHER_TIMEOUT - INTERVAL
    assert at - closed < LAUNCHER_TIMEOUT + INTERVAL + 1.0 + 5.0
    assert silent <= at - closed + INTERVAL + 0.5  # the silence counts from the last beat that got through


def test_without_a_launcher_timeout_the_thread_stops_quietly(server: StoreServer, client: StoreClient,
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    lost = Lost()
    start_heartbeat(client, 5, INTERVAL, on_lost=lost)
    poll(lambda: 5 in server.heartbeat_ages())
    server.close()
    poll(lambda: heartbeat_thread(5) is None)
    assert lost.calls == []
    assert "rank 5 stopped its heartbeat" in capfd.readouterr().err


@pytest.mark.parametrize("progress", [{"step": "3"}, {"step": True}, {"step": 1.5}, {"doing": "x"}, [1, 2], "step 3",
                                      {"step": 3, "collectives": "x"}, {"step": 3, "step_s": float("nan")},
                                      {"step": 3, "doing": 7}, {"step": -1}])
def test_a_malformed_progress_gets_a_clear_error(server: StoreServer, client: StoreClient, progress: Any) -> None:
    # Everything the watchdog reads is checked at the door: a bad report must not reach find_stuck.
    with pytest.raises(RendezvousError, match="heartbeat progress must be an object with integer step and collectives"):
        client.heartbeat(2, progress)
    assert 2 not in server.progress_report()
    # The same connection still works, and the server still serves others.
    assert client.heartbeat(2, {"step": 4, "doing": "step 5", "collectives": 4}) == {}
    assert server.progress_report()[2]["step"] == 4
    with StoreClient("127.0.0.1", server.port, SECRET, timeout=10) as other:
        other.set("k", b"v")
        assert client.get("k", timeout=5) == b"v"


def test_a_malformed_rank_gets_a_clear_error(server: StoreServer, client: StoreClient) -> None:
    for rank in (-1, "0", None):
        with pytest.raises(RendezvousError, match="'rank' is missing or invalid"):
            client.heartbeat(rank, {"step": 1})  # type: ignore[arg-type]
    assert server.heartbeat_ages() == {} and server.progress_report() == {}
    assert client.heartbeat(0) == {}
