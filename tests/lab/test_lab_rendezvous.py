"""The rendezvous store of a real `macrun run` turns strangers away and the run carries on unharmed.

While rank 0 waits, the test (this machine, on the lab bridge) opens two connections to the store that
rank 0 was told about: one answers the challenge with a wrong proof, one sends random bytes. Both must be
refused and logged by macrun, and the run must still finish on every rank with exit 0.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import struct
from pathlib import Path

import pytest

from distributed.store import MAGIC, NONCE_BYTES
from tests.lab.labnet import Lab, wait_until
from tests.lab.scripts.macrun_proc import SCRIPTS, MacrunProcess

pytestmark = pytest.mark.timeout(90)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Up to `n` bytes: fewer when the peer closes (a reset counts, as it is how a close with unread data
    arrives)."""
    data = b""
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def recv_frame(sock: socket.socket) -> bytes:
    """One length-prefixed frame; b"" when the store closed the connection first."""
    head = recv_exact(sock, 4)
    if len(head) < 4:
        return b""
    (n,) = struct.unpack(">I", head)
    return recv_exact(sock, n)


def test_store_refuses_a_wrong_proof_and_garbage_and_the_run_still_succeeds(lab: Lab, tmp_path: Path) -> None:
    hosts = lab.write_hosts_file(tmp_path / "hosts.json")
    release = tmp_path / "release"  # /tmp is shared with the hosts: the ranks see it appear
    with MacrunProcess(["run", "--hosts", str(hosts), "--name", "rdzv", "--",
                        "python", str(SCRIPTS / "store_then_wait.py"), str(release)],
                       home=lab.ssh_home, cwd=tmp_path) as run:
        addr, port = run.wait_for(r"^\[rank 0 h0\] store=([\d.]+):(\d+)$", 60).groups()
        # Traffic only to lab addresses: the store must be reached over the lab's bridge.
        assert addr == lab.master_ip
        assert ipaddress.ip_address(addr) in ipaddress.ip_network(f"{lab.subnet}.0.0/24")

        with socket.create_connection((addr, int(port)), timeout=10) as wrong_proof:
            challenge = recv_frame(wrong_proof)
            assert challenge.startswith(MAGIC) and len(challenge) == len(MAGIC) + NONCE_BYTES
            forged = os.urandom(2 * NONCE_BYTES)  # a client nonce and an HMAC made without the secret
            wrong_proof.sendall(struct.pack(">I", len(forged)) + forged)
            assert recv_frame(wrong_proof) == b"\x00", "the store must say no"
            assert recv_frame(wrong_proof) == b"", "and then hang up"
            peer1 = "{}:{}".format(*wrong_proof.getsockname()[:2])

        with socket.create_connection((addr, int(port)), timeout=10) as garbage:
            recv_frame(garbage)
            # A first byte of 0xff makes a length prefix far over the handshake's limit.
            garbage.sendall(b"\xff" + os.urandom(255))
            assert recv_frame(garbage) == b"", "garbage gets no answer, only a closed connection"
            peer2 = "{}:{}".format(*garbage.getsockname()[:2])

        run.wait_for(rf"^rendezvous: refused {re.escape(peer1)} \(bad proof\)$", 10)
        run.wait_for(rf"^rendezvous: refused {re.escape(peer2)} \(malformed handshake\)$", 10)
        release.touch()
        assert run.finish(timeout=60) == 0, run.stdout + run.stderr
    for rank in range(3):
        assert f"[rank {rank} h{rank}] done rank={rank} sum=6" in run.stdout, run.stdout
    assert len(re.findall(r"rendezvous: refused", run.stdout)) == 2, run.stdout
    assert "Traceback" not in run.stdout + run.stderr
    wait_until(lambda: all(lab.stray_pids(h) == [] for h in lab.hosts), 5, "the hosts to be left clean")
