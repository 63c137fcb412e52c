"""Framing and proof helpers of the rendezvous store, over socketpairs (no server)."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from distributed.errors import RendezvousError
from distributed.store import (
    HEADER_LIMIT,
    FrameError,
    _Secret,
    compute_proof,
    encode_frame,
    new_secret,
    recv_frame,
    send_frame,
)

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_encode_frame_is_big_endian_length_then_payload() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"


@pytest.mark.parametrize("size", [0, 1, HEADER_LIMIT, HEADER_LIMIT + 1, 3 * 1024 * 1024 + 7])
def test_frames_round_trip_back_to_back(pair, size: int) -> None:
    a, b = pair
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    # A writer thread, so that a payload larger than the socket buffer cannot deadlock the test.
    writer = threading.Thread(target=lambda: (send_frame(a, payload), send_frame(a, b"next")))
    writer.start()
    assert recv_frame(b, size + 10) == payload
    assert recv_frame(b, 10) == b"next"  # no byte of the first frame leaked into the second
    writer.join(5)


def test_oversized_length_is_refused_before_reading_the_body(pair) -> None:
    a, b = pair
    a.sendall(struct.pack(">I", 0xFFFFFFF0))  # no body follows: reading it would block until the deadline
    started = time.monotonic()
    with pytest.raises(FrameError) as info:
        recv_frame(b, 1024, deadline=time.monotonic() + 5)
    assert info.value.kind == "oversized"
    assert "4294967280" in str(info.value)
    assert time.monotonic() - started < 2


def test_peer_closing_mid_frame_is_reported_as_closed(pair) -> None:
    a, b = pair
    a.sendall(struct.pack(">I", 10) + b"12345")
    a.close()
    with pytest.raises(FrameError) as info:
        recv_frame(b, 100)
    assert info.value.kind == "closed"
    assert "5 of 10" in str(info.value)


def test_deadline_bounds_a_silent_peer(pair) -> None:
    _, b = pair
    started = time.monotonic()
    with pytest.raises(FrameError) as info:
        recv_frame(b, 100, deadline=time.monotonic() + 0.2)
    assert info.value.kind == "timeout"
    assert 0.15 < time.monotonic() - started < 3


def test_deadline_counts_for_the_whole_frame_not_each_recv(pair) -> None:
    a, b = pair
    a.sendall(struct.pack(">I", 10) + b"1")  # a trickling peer must not reset the clock
    with pytest.raises(FrameError) as info:
        recv_frame(b, 100, deadline=time.monotonic() + 0.2)
    assert info.value.kind == "timeout"
    assert "1 of 10" in str(info.value)


def test_frame_error_is_a_rendezvous_error() -> None:
    assert issubclass(FrameError, RendezvousError)


def test_proof_depends_on_key_nonces_order_and_label() -> None:
    key, n1, n2 = b"k" * 32, b"a" * 32, b"b" * 32
    base = compute_proof(key, n1, n2, b"client")
    assert len(base) == 32
    assert compute_proof(key, n1, n2, b"client") == base
    assert compute_proof(b"x" * 32, n1, n2, b"client") != base
    assert compute_proof(key, n2, n1, b"client") != base
    assert compute_proof(key, n1, n2, b"server") != base  # a client proof cannot be reflected as a server one


def test_new_secret_is_fresh_hex() -> None:
    a, b = new_secret(), new_secret()
    assert a != b
    assert len(a) == 64
    int(a, 16)


def test_secret_holder_hides_the_value_and_rejects_empty() -> None:
    value = new_secret()
    holder = _Secret(value)
    assert value not in repr(holder)
    assert value not in str(holder)
    assert value not in f"{holder}"
    assert holder.reveal() == value
    with pytest.raises(RendezvousError, match="empty"):
        _Secret("")
