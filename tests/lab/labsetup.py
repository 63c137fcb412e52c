"""Plumbing under tests/lab/labnet.py: links, shapers, sysctls, the hosts' Python, and their removal."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from collections.abc import Iterable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from tests.support.sshd import SSHD, run_in_netns

if TYPE_CHECKING:
    from tests.lab.labnet import Lab

HOSTPY_CACHE = Path(os.environ.get("MACRUN_LAB_CACHE", "/var/cache/macrun-lab"))
HOST_PACKAGES = ("numpy", "pyyaml", "safetensors")
SYSCTL_SAVE = Path("/run/macrun-lab/bridge-nf-sysctls.json")  # shared by concurrent labs
BRIDGE_NF = [f"/proc/sys/net/bridge/bridge-nf-call-{t}" for t in ("iptables", "ip6tables", "arptables")]
STATE_MARKER = ".macrun-lab"
LOCK_FILE = Path("/run/lock/macrun-lab.lock" if Path("/run/lock").is_dir() else "/tmp/macrun-lab.lock")
HZ = 250  # this kernel's timer tick; a tbf bucket must hold at least one tick's worth of bytes


class LabUnavailable(RuntimeError):
    """The lab cannot run on this machine (not root, a tool missing, namespaces refused)."""


def check_prerequisites() -> None:
    """Raise LabUnavailable with a one-line reason unless root, the tools and network namespaces are here."""
    if os.geteuid() != 0:
        raise LabUnavailable("the lab needs root (network namespaces, tc, sshd)")
    missing = [t for t in ("ip", "tc", "nsenter", "unshare", "ssh-keygen") if shutil.which(t) is None]
    if not Path(SSHD).exists():
        missing.append(SSHD)
    if missing:
        raise LabUnavailable(f"the lab needs {', '.join(missing)} "
                             "(Debian: iproute2 openssh-server util-linux)")
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise LabUnavailable(f"cannot create a network namespace: {probe.stderr.strip() or probe.returncode}")


@contextlib.contextmanager
def machine_lock() -> Iterator[None]:
    """Serialise changes to this machine's network set-up between labs (other pytest runs, labctl)."""
    with open(LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def run_ip(args: Sequence[str], batch: Iterable[str] = (), *, tool: str = "ip", force: bool = False) -> None:
    """Run `ip`/`tc` with `args`, feeding `batch` lines to `-batch -`; raise with its stderr on failure."""
    lines = list(batch)
    argv = [tool, *(["-force"] if force else []), *args, *(["-batch", "-"] if lines else [])]
    out = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True, text=True)
    if out.returncode != 0 and not force:
        raise RuntimeError(f"{' '.join(argv)} failed: {out.stderr.strip()}")


def build_network(lab: Lab, pairs: Sequence[tuple[int, int]]) -> None:
    """Create namespaces, bridge, ifb, veths and tc shapers for `lab` (see labnet's module docstring)."""
    p, hosts = lab.prefix, lab.hosts
    br, air = f"{p}-br", f"{p}-air"
    run_ip([], [f"netns add {h.netns}" for h in hosts])
    for h in hosts:  # IPv6 off before links arrive: no DAD or router solicitations on the lab segment
        run_in_netns(h.netns, lambda: _write_sysctls({"/proc/sys/net/ipv6/conf/all/disable_ipv6": "1",
                                                      "/proc/sys/net/ipv6/conf/default/disable_ipv6": "1"}))
    # mcast_snooping off: with no IGMP querier on the segment, snooping could drop mDNS between hosts
    create = [f"link add {br} type bridge mcast_snooping 0", f"link add {air} type ifb"]
    create += [f"link add {p}-{h.name}w type veth peer name wifi0 netns {h.netns}" for h in hosts]
    create += [f"link add thunderbolt0 netns {hosts[a].netns} type veth peer name thunderbolt1 "
               f"netns {hosts[b].netns}" for a, b in pairs]
    run_ip([], create)
    root_links = [br, air, *(f"{p}-{h.name}w" for h in hosts)]
    _write_sysctls({f"/proc/sys/net/ipv6/conf/{d}/disable_ipv6": "1" for d in root_links}, missing_ok=True)
    enslave = [f"addr add {lab.master_ip}/24 dev {br}", f"link set {br} up", f"link set {air} up"]
    for h in hosts:
        enslave += [f"link set {p}-{h.name}w master {br}", f"link set {p}-{h.name}w up"]
    run_ip([], enslave)
    for h in hosts:
        lines = ["link set lo up", f"addr add {h.wifi_ip}/24 dev wifi0", "link set wifi0 up"]
        for iface, ip in h.tb.items():
            lines += [] if lab.neutral else [f"addr add {ip}/30 dev {iface}"]
            lines += [f"link set {iface} up"]
        if lab.neutral and h.tb:  # IPv6 link-local on the cables only (how a host finds its peer), no DAD wait
            ipv6 = {f"/proc/sys/net/ipv6/conf/{i}/{key}": value for i in h.tb
                    for key, value in (("accept_dad", "0"), ("disable_ipv6", "0"))}
            run_in_netns(h.netns, lambda: _write_sysctls(ipv6))  # noqa: B023 - runs before the loop moves on
        run_ip(["-n", h.netns], lines)
    # One shaper for the whole segment: every frame entering the bridge from a host (veth ingress) and
    # every frame the master sends into it (bridge egress) passes once through the ifb.
    # (this kernel has no matchall classifier: u32 matching zero bits of offset 0 matches every frame)
    to_air = f"protocol all u32 match u32 0 0 action mirred egress redirect dev {air}"
    shape = [*airtime_shaper(air, lab.wifi_rate, [lab.master_ip, *(h.wifi_ip for h in hosts)]),
             f"qdisc add dev {br} clsact", f"filter add dev {br} egress {to_air}"]
    for h in hosts:
        veth = f"{p}-{h.name}w"
        shape += [f"qdisc add dev {veth} clsact",
                  f"filter add dev {veth} ingress {to_air}"]
    run_ip([], shape, tool="tc")
    for h in hosts:
        if h.tb:
            run_ip(["-n", h.netns], [f"qdisc add dev {iface} root tbf {_tbf_args(lab.tb_rate, latency_ms=10)}"
                                     for iface in h.tb], tool="tc")


def airtime_shaper(dev: str, rate: str, stations: Sequence[str]) -> list[str]:
    """tc lines shaping `dev` to `rate` in all, shared fairly by the transmitting `stations` (source IPs).

    One FIFO behind a tbf lets one TCP flow starve another; Wi-Fi instead gives each station roughly equal
    airtime. An htb parent caps the segment; each station's class is guaranteed an equal share and may
    borrow up to the whole rate when the others are idle (unmatched frames, e.g. ARP, share a last class).
    """
    bits, burst = _rate_bits(rate), _burst_bytes(rate)
    share = bits // (len(stations) + 1)
    queue = max(bits // 8 // 20, 64 * 1024)  # 50 ms of the whole rate per station
    lines = [f"qdisc add dev {dev} root handle 1: htb default {len(stations) + 10}",
             f"class add dev {dev} parent 1: classid 1:1 htb rate {bits}bit ceil {bits}bit "
             f"burst {burst} cburst {burst}"]
    for k in range(len(stations) + 1):
        lines += [f"class add dev {dev} parent 1:1 classid 1:{k + 10} htb rate {share}bit ceil {bits}bit "
                  f"burst {burst} cburst {burst}",
                  f"qdisc add dev {dev} parent 1:{k + 10} bfifo limit {queue}"]
    lines += [f"filter add dev {dev} parent 1: protocol ip prio 1 u32 match ip src {ip}/32 flowid 1:{k + 10}"
              for k, ip in enumerate(stations)]
    return lines


def delete_network(prefix: str, namespaces: Sequence[str]) -> None:
    """Delete the namespaces and every root-namespace link named `<prefix>-*` (errors ignored)."""
    lines = [f"link del {name}" for name in list_links(prefix)]
    lines += [f"netns del {ns}" for ns in namespaces]
    if lines:
        run_ip([], lines, force=True)


def list_namespaces(prefix: str) -> list[str]:
    """Network namespaces named like a lab host of `prefix` (`<prefix>-h<N>`; `prefix` is a regex)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if re.fullmatch(rf"{prefix}-h\d+", n)]


def list_links(prefix: str) -> list[str]:
    """Root-namespace links whose name starts with `<prefix>-`."""
    return [n for n in _all_links() if n.startswith(f"{prefix}-")]


def pick_subnet(prefix: str) -> str:
    """A 10.X prefix no route or address here uses (Wi-Fi 10.X.0.0/24, Thunderbolt link K 10.X.K.0/30)."""
    used = "".join(subprocess.run(["ip", "-4", *args], capture_output=True, text=True).stdout
                   for args in (["-o", "addr"], ["route", "show", "table", "all"]))
    start = 0 if prefix == "mrl" else zlib.crc32(prefix.encode()) % 24  # the default lab: 10.231
    for k in range(24):
        x = 231 + (start + k) % 24
        if not re.search(rf"(?<![\d.])10\.{x}\.", used):
            return f"10.{x}"
    raise LabUnavailable("no free 10.231-254.0.0/16 subnet for the lab")


def disable_bridge_netfilter() -> dict[str, str]:
    """Set net.bridge.bridge-nf-call-* to 0; return the values this machine had before any lab was up."""
    if SYSCTL_SAVE.exists():
        return dict(json.loads(SYSCTL_SAVE.read_text()))
    original = {p: Path(p).read_text().strip() for p in BRIDGE_NF if Path(p).exists()}
    SYSCTL_SAVE.parent.mkdir(parents=True, exist_ok=True)
    SYSCTL_SAVE.write_text(json.dumps(original))
    _write_sysctls({p: "0" for p in original})
    return original


def restore_sysctls() -> None:
    """Put back the bridge netfilter sysctls saved by the first lab, once no lab (no `*-air`) is left up."""
    if not SYSCTL_SAVE.exists() or any(n.endswith("-air") for n in _all_links()):
        return
    _write_sysctls(json.loads(SYSCTL_SAVE.read_text()), missing_ok=True)
    SYSCTL_SAVE.unlink(missing_ok=True)
    try:
        SYSCTL_SAVE.parent.rmdir()
    except OSError:
        pass


def fresh_state_dir(path: Path) -> Path:
    """Empty `path` for a new lab; refuse a non-empty directory that a lab did not create."""
    path = path.resolve()
    if path.exists() and any(path.iterdir()):
        if not (path / STATE_MARKER).exists():
            raise ValueError(f"{path} is not empty and is not a lab state dir; pick another state_dir")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / STATE_MARKER).write_text("state of a macrun test lab; deleted by the next lab up\n")
    return path


def ensure_host_python(*, with_mlx_lm: bool = False) -> str:
    """The hosts' interpreter: a venv with only MLX (same version as here), numpy, pyyaml and safetensors;
    with `with_mlx_lm`, another one that also has mlx-lm (this machine's version), as a Mac that fine-tunes.

    macrun itself must not be importable there (it ships its own package to the hosts). Built once under
    MACRUN_LAB_CACHE (default /var/cache/macrun-lab) with pip and reused; MACRUN_LAB_HOST_PYTHON overrides
    the plain one.
    """
    if (override := os.environ.get("MACRUN_LAB_HOST_PYTHON")) and not with_mlx_lm:
        return override
    mlx_version = metadata.version("mlx")
    extra = (f"mlx-lm=={metadata.version('mlx-lm')}",) if with_mlx_lm else ()
    tag = f"-mlxlm{metadata.version('mlx-lm')}" if with_mlx_lm else ""
    venv = HOSTPY_CACHE / f"hostpy-mlx{mlx_version}{tag}-py{sys.version_info.major}{sys.version_info.minor}"
    python = venv / "bin" / "python"
    done = venv / ".complete"
    if done.exists():
        return str(python)
    HOSTPY_CACHE.mkdir(parents=True, exist_ok=True)
    with open(HOSTPY_CACHE / ".lock", "w") as lock:  # two pytest runs must not build it at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return str(python)
        shutil.rmtree(venv, ignore_errors=True)
        base = getattr(sys, "_base_executable", sys.executable)
        steps = [[base, "-m", "venv", str(venv)],
                 [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                  f"mlx[cpu]=={mlx_version}" if sys.platform == "linux" else f"mlx=={mlx_version}",
                  *HOST_PACKAGES, *extra]]
        for argv in steps:
            out = subprocess.run(argv, capture_output=True, text=True)
            if out.returncode != 0:
                tail = "\n".join(out.stderr.strip().splitlines()[-5:])
                raise LabUnavailable(f"could not build the hosts' Python at {venv}: {tail}")
        done.write_text(f"mlx {mlx_version}\n")
    return str(python)


def paths_to_keep(pythons: Iterable[str]) -> list[str]:
    """Top-level dirs under root's home that the interpreters live in (bound back into each host's home)."""
    real_home = Path(os.path.expanduser("~root")).resolve()
    keep: set[str] = set()
    for python in pythons:
        for candidate in (Path(python).absolute(), Path(python).resolve()):
            if candidate.is_relative_to(real_home) and candidate != real_home:
                keep.add(str(real_home / candidate.relative_to(real_home).parts[0]))
    return sorted(keep)


def _all_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def _tbf_args(rate: str, *, latency_ms: int) -> str:
    return f"rate {rate} burst {_burst_bytes(rate)} latency {latency_ms}ms"


def _burst_bytes(rate: str) -> int:
    return max(_rate_bits(rate) // 8 // HZ, 32 * 1024) * 2


def _rate_bits(rate: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)(bit|bps)", rate.strip().lower())
    if not m:
        raise ValueError(f"rate {rate!r} is not like 200mbit or 10gbit")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2)] * (8 if m.group(3) == "bps" else 1)
    return int(float(m.group(1)) * scale)


def _write_sysctls(values: dict[str, str], *, missing_ok: bool = False) -> None:
    for path, value in values.items():
        try:
            Path(path).write_text(value)
        except FileNotFoundError:
            if not missing_ok:
                raise
