"""The emulated multi-host lab: network namespaces with sshd, a shaped Wi-Fi bridge and Thunderbolt links.

    lab = Lab.up(3)                    # h0..h2, Wi-Fi 200 Mbit/s shared, ring of 10 Gbit/s thunderbolt links
    lab.exec(lab.hosts[0], ["ip", "-br", "addr"])
    lab.down()

Topology (DESIGN.md "The test lab"): each host `<prefix>-hN` is a network namespace whose `wifi0` is a veth
into the bridge `<prefix>-br` in the root namespace, which also holds `master_ip` (this machine plays the
user's laptop). All frames crossing the bridge, in either direction, are redirected through one ifb device
`<prefix>-air` whose htb caps the whole segment at `wifi_rate` and splits it fairly among the stations
sending, like Wi-Fi airtime (labsetup.airtime_shaper; no netem on this kernel, hence no emulated delay).
Ring neighbours are joined by point-to-point veths: `thunderbolt0` of hN leads to h(N+1) and arrives
there as `thunderbolt1`; each link has its own /30 and a tbf of `tb_rate` at each end (full duplex).
Each host runs its own sshd on port 22 in a private mount namespace where root's home (/root) is the
host's own `home` dir (pyenv and the like bound back in), so homes are separate while /tmp, /work and
the rest of this machine's file system stay shared.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tests.lab import labsetup
from tests.lab.labsetup import LabUnavailable
from tests.support.sshd import SshdHandle, make_client_key, make_ssh_home, start_sshd

STATE_FILE = "lab.json"
WIFI_IFACE = "wifi0"
SESSION_KINDS = "tuvw"


@dataclass
class LabHost:
    """One emulated Mac: its namespace, addresses, sshd and directories."""

    name: str  # "h0"
    netns: str  # "<prefix>-h0"
    wifi_ip: str
    tb: dict[str, str]  # thunderbolt iface -> own address
    tb_peers: dict[str, str]  # thunderbolt iface -> the neighbour's address on that link
    ssh_port: int
    workdir: Path
    python: str
    home: Path
    sshd_pid: int = 0
    tb_neighbours: dict[str, str] = field(default_factory=dict)  # thunderbolt iface -> neighbour's name
    announcer_pid: int = 0
    mdns_name: str = ""  # instance name it announces ("h0"; "<prefix>-h0" outside the default lab)


@dataclass
class Lab:
    """A running lab; build it with `Lab.up`, tear it down with `down` (idempotent)."""

    prefix: str
    state_dir: Path
    subnet: str  # "10.231": Wi-Fi is <subnet>.0.0/24, thunderbolt link k is <subnet>.<k+1>.0/30
    master_ip: str
    hosts: list[LabHost]
    ssh_home: Path
    client_key: Path
    wifi_rate: str
    tb_rate: str
    sysctls: dict[str, str] = field(default_factory=dict)  # original values, restored by down()
    neutral: bool = False  # thunderbolt veths up with no IPv4 (the addresses in `tb` are planned, not set)
    _sshds: list[SshdHandle] = field(default_factory=list, repr=False)
    _children: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)
    _is_up: bool = field(default=True, repr=False)

    # ---- life cycle -------------------------------------------------------------------------------------
    @classmethod
    def up(
        cls,
        n: int = 3,
        *,
        wifi_rate: str = "200mbit",
        tb_rate: str = "10gbit",
        thunderbolt: bool = True,
        prefix: str = "mrl",
        state_dir: Path | None = None,
        host_python: str | None = None,
        announce_mdns: bool = False,
        neutral: bool = False,
    ) -> Lab:
        """Bring up `n` hosts; raises LabUnavailable when this machine cannot host the lab.

        `neutral`: the thunderbolt veths come up without IPv4 addresses but with IPv6 link-local ones, like
        cabled Macs before any set-up, for `macrun hosts setup-thunderbolt` to find and configure.
        """
        labsetup.check_prerequisites()
        if not 1 <= n <= 40 or not re.fullmatch(r"[a-z][a-z0-9]{0,5}", prefix):
            raise ValueError("n must be 1..40 and prefix 1-6 lowercase letters/digits")
        cls.cleanup_stale(prefix, state_dir)
        state_dir = labsetup.fresh_state_dir(Path(state_dir or default_state_dir(prefix)))
        python = host_python or labsetup.ensure_host_python()
        pairs = ring_pairs(n) if thunderbolt else []
        with labsetup.machine_lock():  # concurrent labs must not pick the same subnet
            subnet = labsetup.pick_subnet(prefix)
            lab = cls._plan(prefix, n, subnet, state_dir, python, pairs, wifi_rate, tb_rate)
            lab.neutral = neutral
            try:
                lab.sysctls = labsetup.disable_bridge_netfilter()
                lab.save()  # early, so a crash half-way is still cleaned up by cleanup_stale
                labsetup.build_network(lab, pairs)
            except BaseException:
                lab._is_up = False
                lab._remove_network(locked=True)
                raise
        try:
            lab._start_sshds()
            if announce_mdns:
                lab._start_announcers()
            lab.write_hosts_file(state_dir / "hosts.json")
            lab.save()
        except BaseException:
            lab.down()
            raise
        return lab

    @classmethod
    def _plan(cls, prefix: str, n: int, subnet: str, state_dir: Path, python: str,
              pairs: Sequence[tuple[int, int]], wifi_rate: str, tb_rate: str) -> Lab:
        """The lab's names and addresses, before anything is created."""
        lab = cls(prefix=prefix, state_dir=state_dir, subnet=subnet, master_ip=f"{subnet}.0.1", hosts=[],
                  ssh_home=state_dir / "master-home", client_key=state_dir / "client" / "id_ed25519",
                  wifi_rate=wifi_rate, tb_rate=tb_rate)
        for i in range(n):
            lab.hosts.append(LabHost(
                name=f"h{i}", netns=f"{prefix}-h{i}", wifi_ip=f"{subnet}.0.{10 + i}", tb={}, tb_peers={},
                ssh_port=22, workdir=state_dir / f"h{i}" / "work", python=python,
                home=state_dir / f"h{i}" / "home",
                mdns_name=f"h{i}" if prefix == "mrl" else f"{prefix}-h{i}"))
        for k, (a, b) in enumerate(pairs):
            ha, hb = lab.hosts[a], lab.hosts[b]
            ip_a, ip_b = f"{subnet}.{k + 1}.1", f"{subnet}.{k + 1}.2"
            ha.tb["thunderbolt0"], hb.tb["thunderbolt1"] = ip_a, ip_b
            ha.tb_peers["thunderbolt0"], hb.tb_peers["thunderbolt1"] = ip_b, ip_a
            ha.tb_neighbours["thunderbolt0"], hb.tb_neighbours["thunderbolt1"] = hb.name, ha.name
        return lab

    def down(self) -> None:
        """Kill every process in the lab's namespaces and delete everything it created. Idempotent."""
        if not self._is_up:
            return
        self._is_up = False
        for host in self.hosts:
            kill_netns_processes(host.netns)
        for handle in self._sshds:  # also those whose namespace vanished under them (nothing lists them)
            handle.stop()
        for proc in self._children:
            proc.kill()
            proc.wait(timeout=5)
        self._remove_network()

    def _remove_network(self, *, locked: bool = False) -> None:
        with contextlib.nullcontext() if locked else labsetup.machine_lock():
            labsetup.delete_network(self.prefix, [h.netns for h in self.hosts])
            labsetup.restore_sysctls()
        (self.state_dir / STATE_FILE).unlink(missing_ok=True)

    @classmethod
    def cleanup_stale(cls, prefix: str = "mrl", state_dir: Path | None = None) -> bool:
        """Remove what a crashed earlier lab with `prefix` left behind; True when something was found."""
        state = Path(state_dir or default_state_dir(prefix)) / STATE_FILE
        had_state = state.exists()
        namespaces = labsetup.list_namespaces(prefix)
        links = labsetup.list_links(prefix)
        for ns in namespaces:
            kill_netns_processes(ns)
        with labsetup.machine_lock():
            if namespaces or links:
                labsetup.delete_network(prefix, namespaces)
            labsetup.restore_sysctls()
        state.unlink(missing_ok=True)
        return bool(namespaces or links or had_state)

    @classmethod
    def cleanup_dead_sessions(cls) -> list[str]:
        """Remove labs of processes that died without tearing down (prefixes from `session_prefix`)."""
        removed = []
        namespaces = labsetup.list_namespaces(f"[{SESSION_KINDS}][0-9a-z]+")
        for prefix in sorted({ns.split("-")[0] for ns in namespaces}):
            if not Path(f"/proc/{int(prefix[1:], 36)}").exists():
                cls.cleanup_stale(prefix)
                removed.append(prefix)
        return removed

    @classmethod
    def load(cls, state_dir: Path) -> Lab:
        """The lab described by `state_dir/lab.json` (written by `up`), e.g. to take it down from labctl."""
        data = json.loads((state_dir / STATE_FILE).read_text())
        hosts = [LabHost(**{**h, "workdir": Path(h["workdir"]), "home": Path(h["home"])})
                 for h in data["hosts"]]
        return cls(**{**data, "hosts": hosts, "state_dir": Path(data["state_dir"]),
                      "ssh_home": Path(data["ssh_home"]), "client_key": Path(data["client_key"])})

    def save(self) -> Path:
        """Write what was created to `state_dir/lab.json`."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        data["hosts"] = [asdict(h) for h in self.hosts]
        path = self.state_dir / STATE_FILE
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        return path

    # ---- using it -------------------------------------------------------------------------------------
    def host(self, name: str) -> LabHost:
        """The host called `name` ("h1")."""
        return next(h for h in self.hosts if h.name == name)

    def exec(self, host: LabHost, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run argv on `host` (its network, mount and UTS namespaces, HOME = its home) and wait for it."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self._wrap(host, argv, kw), **kw)

    def popen(self, host: LabHost, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start argv on `host` like `exec`, without waiting; the caller owns the process."""
        return subprocess.Popen(self._wrap(host, argv, kw), **kw)

    def pids(self, host: LabHost) -> list[int]:
        """Every process in the host's network namespace (`ip netns pids`), the lab's own included."""
        return netns_pids(host.netns)

    def stray_pids(self, host: LabHost) -> list[int]:
        """`pids` minus the lab's own processes (sshd listener, mDNS announcer): what a job left behind."""
        own = {host.sshd_pid, host.announcer_pid}
        return [p for p in self.pids(host) if p not in own]

    def write_hosts_file(
        self, path: Path, *, slots: int = 1, hosts: Sequence[int] | None = None, **fields: Any
    ) -> Path:
        """Write a macrun hosts.json for the lab's hosts (all, or the given indices).

        Extra `fields` go into every entry; a callable value is called with the LabHost, e.g.
        `fast_ips=lambda h: list(h.tb.values())`.
        """
        entries = []
        for i in hosts if hosts is not None else range(len(self.hosts)):
            h = self.hosts[i]
            entry: dict[str, Any] = {"name": h.name, "host": h.wifi_ip, "user": "root", "python": h.python,
                                     "workdir": str(h.workdir), "slots": slots}
            entry.update({k: v(h) if callable(v) else v for k, v in fields.items()})
            entries.append(entry)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"hosts": entries}, indent=2) + "\n")
        return path

    def known_hosts_lines(self) -> list[str]:
        """known_hosts lines for every host under each of its addresses (also in `ssh_home`)."""
        lines = []
        for h in self.hosts:
            key = (self.state_dir / h.name / "sshd" / "ssh_host_ed25519_key.pub").read_text().split()[:2]
            lines += [f"{ip} {' '.join(key)}" for ip in [h.wifi_ip, *h.tb.values()]]
        return lines

    # ---- internals -----------------------------------------------------------------------------------
    def _wrap(self, host: LabHost, argv: Sequence[str], kw: dict[str, Any]) -> list[str]:
        cwd = kw.pop("cwd", None)
        env = dict(kw.pop("env", None) or os.environ)
        env["HOME"] = "/root"  # inside the host's mount namespace this is the host's own home
        kw["env"] = env
        if host.sshd_pid and Path(f"/proc/{host.sshd_pid}").exists():
            return ["nsenter", "-t", str(host.sshd_pid), "-n", "-m", "-u", f"--wd={cwd or '/'}", "--", *argv]
        prefix = ["ip", "netns", "exec", host.netns]
        return [*prefix, "sh", "-c", 'cd "$0" && exec "$@"', str(cwd or "/"), *argv]

    def _start_sshds(self) -> None:
        key, public = make_client_key(self.client_key.parent)
        keep = labsetup.paths_to_keep([h.python for h in self.hosts] + [sys.executable])
        for h in self.hosts:
            h.workdir.mkdir(parents=True, exist_ok=True)
            handle = start_sshd(self.state_dir / h.name / "sshd", listen="0.0.0.0", port=22, netns=h.netns,
                                authorized_keys=[public], home=h.home, keep_paths=keep, probe_host=h.wifi_ip,
                                hostname=h.name)
            self._sshds.append(handle)
            h.sshd_pid = handle.process.pid
        make_ssh_home(self.ssh_home, key, self.known_hosts_lines())

    def _start_announcers(self) -> None:
        script = Path(__file__).with_name("mdns_announce.py")
        started = []
        for h in self.hosts:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", h.netns, sys.executable, str(script), "--ip", h.wifi_ip,
                 "--name", h.mdns_name, "--model", "Mac16,10"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True)
            self._children.append(proc)
            started.append((h, proc))
        for h, proc in started:  # the announcer prints one line once its services are registered
            assert proc.stdout is not None
            line = proc.stdout.readline().decode().strip()
            if line != "ready":
                raise RuntimeError(f"mDNS announcer on {h.name} failed: {line or 'no output'}")
            h.announcer_pid = proc.pid


def ring_pairs(n: int) -> list[tuple[int, int]]:
    """Thunderbolt links as (a, b) pairs, a's thunderbolt0 meeting b's thunderbolt1; a ring for n >= 3."""
    if n < 2:
        return []
    if n == 2:
        return [(0, 1)]
    return [(i, (i + 1) % n) for i in range(n)]


def session_prefix(kind: int = 0, pid: int | None = None) -> str:
    """A lab prefix owned by this process, so concurrent pytest runs never clash.

    "tuvw"[kind] + the pid in base 36: kind 0 is the session lab, 1-3 are free for a test's private lab.
    `Lab.cleanup_dead_sessions` removes such labs once their process is gone.
    """
    pid = os.getpid() if pid is None else pid
    digits = ""
    while pid:
        pid, d = divmod(pid, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[d] + digits
    return SESSION_KINDS[kind] + (digits or "0")


def default_state_dir(prefix: str) -> Path:
    """/tmp/macrun-lab for the default prefix, /tmp/macrun-lab-<prefix> otherwise."""
    return Path("/tmp/macrun-lab" if prefix == "mrl" else f"/tmp/macrun-lab-{prefix}")


def netns_pids(netns: str) -> list[int]:
    """Pids whose network namespace is `netns` (empty when it does not exist)."""
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()] if out.returncode == 0 else []


def kill_netns_processes(netns: str, deadline_s: float = 5.0) -> None:
    """SIGKILL every process in `netns` until none is left (re-listing catches ones forked meanwhile)."""
    deadline = time.monotonic() + deadline_s
    while pids := netns_pids(netns):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in {netns} survived SIGKILL for {deadline_s} s")
        time.sleep(0.01)  # polling interval of a deadline loop


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `predicate` until it holds or `timeout` seconds pass (then raise TimeoutError naming `what`)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


__all__ = ["Lab", "LabHost", "LabUnavailable", "default_state_dir", "kill_netns_processes", "netns_pids",
           "ring_pairs", "session_prefix", "wait_until"]
