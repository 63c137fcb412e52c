"""The fault injectors of tests/lab/faults.py do what they say, on real links and real processes in the lab.

Every test puts the lab back as it found it (links up, its processes gone), even when it fails: the lab
is shared by the whole session.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Iterator

import pytest

from tests.lab.faults import cut_link, link_down, link_up, process_state, rank_pids, signal_rank
from tests.lab.labnet import Lab, LabHost, wait_until

pytestmark = pytest.mark.timeout(60)

CONNECT_TIMEOUT_S = 1.0  # a dead link shows as a connect timeout; a live one answers in milliseconds
SSH_PORT = 22
# A stand-in for a training process: its command line holds "distributed.worker", it lives ~100 s.
FAKE_RANK = "import time; [time.sleep(0.05) for _ in range(2000)]"


def _sshd_answers(lab: Lab, src: LabHost | None, ip: str) -> bool:
    """True when sshd at `ip` sends its banner to a connection from `src` (None: the master)."""
    if src is None:
        try:
            with socket.create_connection((ip, SSH_PORT), timeout=CONNECT_TIMEOUT_S) as sock:
                return sock.recv(8).startswith(b"SSH-")
        except OSError:
            return False
    probe = ("import socket, sys\n"
             "try:\n"
             f"    s = socket.create_connection((sys.argv[1], {SSH_PORT}), timeout={CONNECT_TIMEOUT_S})\n"
             "except OSError:\n"
             "    sys.exit(1)\n"
             "sys.exit(0 if s.recv(8).startswith(b'SSH-') else 1)\n")
    return lab.exec(src, [src.python, "-c", probe, ip], timeout=30).returncode == 0


@pytest.fixture
def fake_ranks(lab: Lab) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start processes with `lab.popen` by appending to the list; all are killed and reaped afterwards."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.kill()  # SIGKILL works on a stopped process too
        proc.wait(10)


def _start(lab: Lab, host: LabHost, *args: str) -> subprocess.Popen[bytes]:
    # lab.popen execs into the target (nsenter without -p does not fork), so the pid is the python's own
    return lab.popen(host, [host.python, "-c", FAKE_RANK, *args], stdin=subprocess.DEVNULL)


# ---- links ------------------------------------------------------------------------------------------------
def test_pulled_cable_is_dead_from_both_ends_and_works_again_once_plugged_back(lab: Lab) -> None:
    h0 = lab.hosts[0]
    h1 = lab.host(h0.tb_neighbours["thunderbolt0"])
    h0_ip, h1_ip = h0.tb["thunderbolt0"], h0.tb_peers["thunderbolt0"]
    assert _sshd_answers(lab, h0, h1_ip) and _sshd_answers(lab, h1, h0_ip)
    try:
        link_down(lab, h0, "thunderbolt0")
        assert not _sshd_answers(lab, h0, h1_ip), "h0 still reaches h1 over its downed thunderbolt0"
        assert not _sshd_answers(lab, h1, h0_ip), "h1 still reaches h0 across the pulled cable"
        assert _sshd_answers(lab, None, h1.wifi_ip)  # only the cable is gone, not the host
    finally:
        link_up(lab, h0, "thunderbolt0")
    assert _sshd_answers(lab, h0, h1_ip) and _sshd_answers(lab, h1, h0_ip)


def test_host_off_wifi_is_unreachable_and_reachable_again_once_back(lab: Lab) -> None:
    h0, h2 = lab.hosts[0], lab.hosts[2]
    assert _sshd_answers(lab, None, h2.wifi_ip)
    with cut_link(lab, h2, "wifi0"):
        assert not _sshd_answers(lab, None, h2.wifi_ip), "the master still reaches h2 with its Wi-Fi down"
        assert not _sshd_answers(lab, h0, h2.wifi_ip), "h0 still reaches h2 over Wi-Fi"
        for iface, neighbour in h2.tb_neighbours.items():  # its cables still work
            assert _sshd_answers(lab, lab.host(neighbour), h2.tb[iface])
    # link_up has checked address, route and bridge port; the first connect must now succeed
    assert _sshd_answers(lab, None, h2.wifi_ip)
    assert _sshd_answers(lab, h0, h2.wifi_ip)
    assert process_state(h2.announcer_pid) not in (None, "Z"), "h2's mDNS announcer died with its Wi-Fi"


def test_link_up_is_idempotent_and_an_unknown_interface_is_refused(lab: Lab) -> None:
    h1 = lab.hosts[1]
    link_up(lab, h1, "thunderbolt1")  # already up: nothing changes, the checks still pass
    with pytest.raises(ValueError, match="has no interface 'eth0'"):
        link_down(lab, h1, "eth0")


# ---- ranks ------------------------------------------------------------------------------------------------
def test_stopped_rank_is_frozen_until_continued_and_the_shim_is_never_a_target(
    lab: Lab, fake_ranks: list[subprocess.Popen[bytes]]
) -> None:
    h1 = lab.hosts[1]
    fake_ranks.append(_start(lab, h1, "distributed.rankshim", "distributed.worker"))  # a shim naming its rank
    fake_ranks.append(worker := _start(lab, h1, "distributed.worker"))
    wait_until(lambda: rank_pids(lab, h1) == [worker.pid], 10, "the fake rank on h1")
    assert signal_rank(lab, h1, signal.SIGSTOP) == [worker.pid]
    wait_until(lambda: process_state(worker.pid) == "T", 5, "the rank to stop")
    assert process_state(fake_ranks[0].pid) != "T"
    assert signal_rank(lab, h1, signal.SIGCONT) == [worker.pid]
    wait_until(lambda: process_state(worker.pid) in ("R", "S"), 5, "the rank to run again")
    assert worker.poll() is None


def test_killed_rank_is_gone(lab: Lab, fake_ranks: list[subprocess.Popen[bytes]]) -> None:
    h2 = lab.hosts[2]
    fake_ranks.append(worker := _start(lab, h2, "distributed.worker"))
    wait_until(lambda: rank_pids(lab, h2) == [worker.pid], 10, "the fake rank on h2")
    assert signal_rank(lab, h2, signal.SIGKILL) == [worker.pid]
    assert worker.wait(10) == -signal.SIGKILL
    assert rank_pids(lab, h2) == [] and process_state(worker.pid) is None


def test_signalling_a_host_without_ranks_fails_loudly(lab: Lab) -> None:
    h0 = lab.hosts[0]
    assert rank_pids(lab, h0) == []
    with pytest.raises(AssertionError, match="no process matching 'distributed.worker'.* on h0 to send SIGKILL"):
        signal_rank(lab, h0, signal.SIGKILL)
