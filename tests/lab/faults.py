"""Fault injectors for lab tests of fault tolerance: pull a cable, drop a host's Wi-Fi, stop or kill a rank.

    link_down(lab, h1, "thunderbolt0")            # the cable h1 <-> h2 is dead at both ends
    link_up(lab, h1, "thunderbolt0")              # ... and back, address and route included
    with cut_link(lab, h2, "wifi0"): ...          # h2 off the Wi-Fi for the block, back on after
    signal_rank(lab, h1, signal.SIGSTOP)          # freeze h1's training process(es); SIGCONT to resume
    FaultSchedule(seed=7, count=6, kinds=FAULT_KINDS, hosts=(1, 2)).faults()   # a soak test's plan

What the lab does (measured on the lab's veths, see tests/lab/test_lab_faults_injectors.py):
- `ip link set thunderbolt0 down` on one host takes the veth's peer (`thunderbolt1` on the neighbour) to
  NO-CARRIER; the neighbour's connected route stays but is marked `linkdown`, so the cable carries nothing
  in either direction. The downed end keeps its IPv4 address and loses its connected route; `link set up`
  brings the kernel route back by itself (IPv4 re-adds the prefix routes of the addresses still on the
  device), and the tbf shaper survives. A TCP connection that was open across the cable survives a pull
  of about a second: its pending segment is retransmitted once the link is back.
- `wifi0` down takes its bridge port in the root namespace to NO-CARRIER, state `disabled`: the host is
  cut off from the master and from the other hosts on Wi-Fi (a connect to its sshd times out), while its
  Thunderbolt links still work. After `link set up` the port is `forwarding` at once (the bridge runs no
  STP), the address and route are back, and the master's connect succeeds on the first try. The mDNS
  announcer (bound to the Wi-Fi address, which never leaves the device) keeps running throughout.
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from tests.lab.labnet import WIFI_IFACE, Lab, LabHost, wait_until

FAULT_KINDS = ("kill", "stop", "cable", "wifi")  # SIGKILL a rank, SIGSTOP it, pull a Thunderbolt cable, drop Wi-Fi
RANK_PATTERN = "distributed.worker"  # in the command line of a training process (launcher/jobs/training.py)
SHIM_PATTERN = "distributed.rankshim"  # the shim that starts it (launcher/transport/ranks.py): never a target
LINK_TIMEOUT_S = 5.0  # a veth's carrier follows its peer within milliseconds; this only bounds a hang
WIFI_PREFIX_LEN, TB_PREFIX_LEN = 24, 30  # as labsetup.build_network assigns them


# ---- links ------------------------------------------------------------------------------------------------
def link_down(lab: Lab, host: LabHost, iface: str, timeout: float = LINK_TIMEOUT_S) -> None:
    """`ip link set IFACE down` on `host`; returns once the other end of the cable has lost its carrier.

    For `thunderbolt0/1` the other end is the neighbour's veth, for `wifi0` the host's port on the Wi-Fi
    bridge; either way the link is then dead in both directions. Idempotent.
    """
    peer_ns, peer_iface = _peer_end(lab, host, iface)
    _ip(host.netns, "link", "set", iface, "down")
    wait_until(lambda: "UP" not in _link_flags(host.netns, iface)
               and "LOWER_UP" not in _link_flags(peer_ns, peer_iface),
               timeout, f"{host.name} {iface} down and its peer {peer_iface} without carrier")


def link_up(lab: Lab, host: LabHost, iface: str, timeout: float = LINK_TIMEOUT_S) -> None:
    """`ip link set IFACE up` on `host`; returns once both ends have carrier and traffic can flow again.

    Checks what the kernel restores by itself: the interface's address, its connected route and, for
    `wifi0`, the bridge port forwarding again. Raises AssertionError naming what is missing otherwise.
    Idempotent.
    """
    peer_ns, peer_iface = _peer_end(lab, host, iface)
    _ip(host.netns, "link", "set", iface, "up")
    wait_until(lambda: "LOWER_UP" in _link_flags(host.netns, iface)
               and "LOWER_UP" in _link_flags(peer_ns, peer_iface),
               timeout, f"carrier on {host.name} {iface} and its peer {peer_iface}")
    if iface == WIFI_IFACE:  # the bridge lives in the root namespace, where /sys/class/net is ours
        state = Path(f"/sys/class/net/{peer_iface}/brport/state")
        wait_until(lambda: state.read_text().strip() == "3", timeout, f"bridge port {peer_iface} forwarding")
    address = _own_address(host, iface)
    network = str(address.network)
    addrs = _ip(host.netns, "-4", "-o", "addr", "show", "dev", iface)
    routes = _ip(host.netns, "-4", "route", "show", "dev", iface)
    assert str(address) in addrs.split(), f"{host.name} {iface} came up without {address}:\n{addrs}"
    assert network in routes.split() and "linkdown" not in routes, \
        f"{host.name} {iface} came up without a usable route to {network}:\n{routes}"


@contextmanager
def cut_link(lab: Lab, host: LabHost, iface: str) -> Iterator[None]:
    """The link is down for the `with` block and up again after it, even when the block fails."""
    try:
        link_down(lab, host, iface)
        yield
    finally:
        link_up(lab, host, iface)


def _peer_end(lab: Lab, host: LabHost, iface: str) -> tuple[str | None, str]:
    """(namespace or None for the root namespace, interface) at the other end of `host`'s `iface`."""
    if iface == WIFI_IFACE:
        return None, f"{lab.prefix}-{host.name}w"  # labsetup.build_network's name for the bridge port
    if iface in host.tb_neighbours:
        other = "thunderbolt1" if iface == "thunderbolt0" else "thunderbolt0"  # ring_pairs: 0 meets 1
        return lab.host(host.tb_neighbours[iface]).netns, other
    raise ValueError(f"{host.name} has no interface {iface!r}; it has {[WIFI_IFACE, *host.tb]}")


def _own_address(host: LabHost, iface: str) -> ipaddress.IPv4Interface:
    if iface == WIFI_IFACE:
        return ipaddress.IPv4Interface(f"{host.wifi_ip}/{WIFI_PREFIX_LEN}")
    return ipaddress.IPv4Interface(f"{host.tb[iface]}/{TB_PREFIX_LEN}")


def _link_flags(netns: str | None, iface: str) -> set[str]:
    """The flags `ip link` prints in <...> for `iface` ("UP", "LOWER_UP", "NO-CARRIER", ...)."""
    out = _ip(netns, "-o", "link", "show", "dev", iface)
    match = re.search(r"<([^>]*)>", out)
    assert match, f"no flags for {iface} in {netns or 'the root namespace'}: {out!r}"
    return set(match.group(1).split(","))


def _ip(netns: str | None, *args: str) -> str:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {out.stderr.strip()}")
    return out.stdout


# ---- ranks ------------------------------------------------------------------------------------------------
def rank_pids(lab: Lab, host: LabHost, pattern: str = RANK_PATTERN) -> list[int]:
    """Pids in `host`'s namespace whose command line contains `pattern`, the rank shims excluded.

    With the default pattern that is the training processes themselves. Processes that already exited
    (zombies have an empty command line) are not listed.
    """
    pids = []
    for pid in lab.pids(host):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            continue  # gone between listing and reading
        if pattern in cmdline and SHIM_PATTERN not in cmdline:
            pids.append(pid)
    return sorted(pids)


def signal_rank(lab: Lab, host: LabHost, sig: signal.Signals, pattern: str = RANK_PATTERN) -> list[int]:
    """Send `sig` (SIGKILL, SIGSTOP, SIGCONT, ...) to every `rank_pids` process; the pids signalled.

    Raises AssertionError when there is none: a fault injected into nothing would make a test pass
    without testing anything.
    """
    signalled = []
    for pid in rank_pids(lab, host, pattern):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            continue
        signalled.append(pid)
    assert signalled, f"no process matching {pattern!r} (shims excluded) on {host.name} to send {sig.name}"
    return signalled


def process_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat ("R", "S", "T" stopped, "Z" zombie ...); None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rindex(")") + 2]  # the command name in (...) may itself hold spaces and parentheses


# ---- a soak test's plan -----------------------------------------------------------------------------------
class Fault(NamedTuple):
    """One fault to inject: what, on which host (an index into `lab.hosts`), after how long."""

    kind: str  # one of FAULT_KINDS
    host: int
    delay_s: float  # seconds to wait after the previous fault (or the start) before injecting this one


@dataclass(frozen=True, kw_only=True, slots=True)
class FaultSchedule:
    """A deterministic, seeded plan of faults for a soak test: the same seed always gives the same faults.

    Kinds are balanced: each kind occurs count // len(kinds) or one more times, so every kind is
    exercised once count >= len(kinds); their order, hosts and delays are drawn from `random.Random(seed)`.
    """

    seed: int
    count: int  # how many faults
    kinds: Sequence[str]  # drawn from FAULT_KINDS
    hosts: Sequence[int]  # host indices faults may hit (e.g. leave out the host of rank 0)
    min_delay_s: float = 2.0
    max_delay_s: float = 6.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.kinds) - set(FAULT_KINDS))
        if unknown or not self.kinds:
            raise ValueError(f"fault kinds must be a non-empty selection of {FAULT_KINDS}, got {list(self.kinds)}")
        if self.count < 0 or not self.hosts or min(self.hosts) < 0:
            raise ValueError(f"need count >= 0 and host indices >= 0, got {self.count} and {list(self.hosts)}")
        if not 0 <= self.min_delay_s <= self.max_delay_s:
            raise ValueError(f"need 0 <= min_delay_s <= max_delay_s, got {self.min_delay_s}, {self.max_delay_s}")

    def faults(self) -> list[Fault]:
        """The plan: `count` faults in the order to inject them."""
        rng = random.Random(self.seed)
        kinds = list(self.kinds)
        picks = kinds * (self.count // len(kinds)) + rng.sample(kinds, self.count % len(kinds))
        rng.shuffle(picks)
        return [Fault(kind, rng.choice(list(self.hosts)), round(rng.uniform(self.min_delay_s, self.max_delay_s), 2))
                for kind in picks]
