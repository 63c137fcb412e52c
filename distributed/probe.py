"""Describe this machine as one JSON object: Python, OS, chip, memory, disk, battery, MLX, interfaces, RDMA.

The launcher runs it on every host over SSH without copying it first:

    python3 - ~/.macrun < distributed/probe.py

Standard library only, and Python 3.9 syntax (macOS's system Python), so it can report a host that is
not ready rather than crash on it. Parsers are pure functions of command output, tested on recorded
output from macOS and Linux; the `collect_*` functions run the commands. RDMA over Thunderbolt is the
exception: the probe hands back the raw output of its commands (bounded, each with its own timeout) and
the launcher parses it (launcher/thunderbolt/rdma.py), which keeps this script small.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from typing import Any

CMD_TIMEOUT_S = 5.0
BATTERY_TIMEOUT_S = 2.0  # pmset answers in milliseconds; a hung one must not hold up a rank
_MLX_CHECK = (
    "import json, mlx.core as mx\n"
    "print(json.dumps({'version': getattr(mx, '__version__', None), 'device': str(mx.default_device())}))"
)

# {"name", "kind", "ipv4": ["a.b.c.d/len"], "members": [...], "up": bool}; a plain alias for Python 3.9
Interface = dict


# ---- pure parsers -------------------------------------------------------------------------------

def parse_ifconfig(text: str) -> dict[str, Interface]:
    """Parse macOS `ifconfig` output into {name: interface}, IPv4 addresses and bridge members."""
    found: dict[str, Interface] = {}
    current: Interface | None = None
    for line in text.splitlines():
        head = re.match(r"^([A-Za-z0-9_.\-]+): flags=\d+<([^>]*)>", line)
        if head:
            flags = head.group(2).split(",")
            current = {"name": head.group(1), "kind": "loopback" if "LOOPBACK" in flags else "other",
                       "ipv4": [], "members": [], "up": "UP" in flags}
            found[current["name"]] = current
            continue
        if current is None:
            continue
        inet = re.match(r"^\s+inet (\d+\.\d+\.\d+\.\d+) netmask (0x[0-9a-fA-F]+|\d+\.\d+\.\d+\.\d+)", line)
        if inet:
            current["ipv4"].append(f"{inet.group(1)}/{_mask_bits(inet.group(2))}")
        member = re.match(r"^\s+member: (\S+)", line)
        if member:
            current["members"].append(member.group(1))
    return found


def _mask_bits(mask: str) -> int:
    value = int(mask, 16) if mask.startswith("0x") else int.from_bytes(socket.inet_aton(mask), "big")
    return bin(value).count("1")


def parse_hardware_ports(text: str) -> dict[str, str]:
    """Parse `networksetup -listallhardwareports` into {device: hardware port name}."""
    ports: dict[str, str] = {}
    port: str | None = None
    for line in text.splitlines():
        if line.startswith("Hardware Port:"):
            port = line.split(":", 1)[1].strip()
        elif line.startswith("Device:") and port is not None:
            ports[line.split(":", 1)[1].strip()] = port
            port = None
    return ports


def classify_macos(interfaces: dict[str, Interface], ports: dict[str, str]) -> None:
    """Set each interface's kind from its hardware port; a bridge of Thunderbolt ports is Thunderbolt."""
    for name, iface in interfaces.items():
        port = ports.get(name, "")
        if iface["kind"] == "loopback":
            continue
        if "Thunderbolt" in port or name.startswith("thunderbolt"):
            iface["kind"] = "thunderbolt"
        elif port in ("Wi-Fi", "AirPort"):
            iface["kind"] = "wifi"
        elif "Ethernet" in port or "LAN" in port:
            iface["kind"] = "ethernet"
        if name.startswith("bridge") and iface["members"] and all(
                "Thunderbolt" in ports.get(m, "") for m in iface["members"]):
            iface["kind"] = "thunderbolt"


def parse_ip_json(text: str) -> dict[str, Interface]:
    """Parse Linux `ip -j -4 addr` output into {name: interface}."""
    found: dict[str, Interface] = {}
    for entry in json.loads(text or "[]"):
        name = entry.get("ifname")
        if not name:
            continue
        flags = entry.get("flags", [])
        iface = {"name": name, "kind": "loopback" if "LOOPBACK" in flags else "other", "ipv4": [],
                 "members": [], "up": "UP" in flags}
        for addr in entry.get("addr_info", []):
            if addr.get("family") == "inet" and addr.get("local"):
                iface["ipv4"].append(f"{addr['local']}/{addr.get('prefixlen', 32)}")
        found[name] = iface
    return found


# What `pmset -g batt` says after the percentage. "AC attached; not charging" is usually optimised
# charging holding at 80%; "finishing charge" is the last minutes before "charged".
BATTERY_STATES = ("not charging", "finishing charge", "discharging", "charging", "charged")
_PMSET_BATTERY = re.compile(r"InternalBattery[^\t\n]*\t\s*(\d+)%([^\n]*)")
_PMSET_STATE = re.compile(r"\s*(" + "|".join(BATTERY_STATES) + r")\b")


def parse_pmset(text: str) -> dict[str, Any] | None:
    """Parse `pmset -g batt`: {"percent", "on_ac", "state"}, or None for a Mac without a battery.

    `state` is one of BATTERY_STATES, or None when macOS words it some other way. Text that is not
    pmset's (empty, an error message) is None too: this runs on every host and must never raise.
    """
    match = _PMSET_BATTERY.search(text or "")
    if not match:
        return None
    state = None
    for field in match.group(2).split(";"):
        word = _PMSET_STATE.match(field)
        if word:
            state = word.group(1)
            break
    return {"percent": int(match.group(1)), "on_ac": "'AC Power'" in text, "state": state}


def battery_problem(battery: dict[str, Any] | None, min_percent: float) -> str | None:
    """Why this host should not train now: on battery below `min_percent`, else None.

    None on AC, without a battery, or when `min_percent` is 0 (the user allowed it). The words name
    the setting, `fault.min_battery`, so the reason says what to change.
    """
    if not battery or min_percent <= 0 or battery.get("on_ac") is not False:
        return None
    percent = battery.get("percent")
    if not isinstance(percent, (int, float)) or percent >= min_percent:
        return None
    return f"on battery at {percent:g}% (below fault.min_battery {min_percent:g}%)"


# Linux's /sys/class/power_supply/*/status words for the same states as pmset's.
_SYSFS_STATES = {"Charging": "charging", "Discharging": "discharging", "Full": "charged",
                 "Not charging": "not charging"}


def parse_power_supply(entries: dict[str, dict[str, str]]) -> dict[str, Any] | None:
    """Linux /sys/class/power_supply as {supply: {file: value}} → battery dict, or None without one."""
    batteries = [e for e in entries.values() if e.get("type") == "Battery" and "capacity" in e]
    if not batteries:
        return None
    mains = [e for e in entries.values() if e.get("type") == "Mains"]
    if mains:
        on_ac = any(e.get("online") == "1" for e in mains)
    else:
        on_ac = all(e.get("status") != "Discharging" for e in batteries)
    return {"percent": int(batteries[0]["capacity"]), "on_ac": on_ac,
            "state": _SYSFS_STATES.get(batteries[0].get("status", ""))}


def parse_meminfo(text: str) -> int:
    """Total memory in bytes from /proc/meminfo."""
    match = re.search(r"^MemTotal:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) * 1024 if match else 0


def parse_cpuinfo(text: str) -> str:
    """The CPU model from /proc/cpuinfo ("model name", or "Model" on some ARM boards)."""
    match = re.search(r"^(?:model name|Model)\s*:\s*(.+)$", text, re.M)
    return match.group(1).strip() if match else ""


def parse_os_release(text: str) -> str:
    """PRETTY_NAME from /etc/os-release."""
    match = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', text, re.M)
    return match.group(1) if match else ""


def nearest_existing(path: str) -> str:
    """The path itself or its closest existing parent (the work dir may not exist yet)."""
    path = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


# ---- collectors (run commands, read files) -------------------------------------------------------

def _run(argv: list[str], timeout: float = CMD_TIMEOUT_S) -> str:
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.decode("utf-8", "replace")


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def collect_interfaces(system: str, ports: dict[str, str] | None = None) -> list[Interface]:
    """Network interfaces with IPv4 addresses, Thunderbolt links marked (macOS: `ports` from networksetup)."""
    if system == "Darwin":
        found = parse_ifconfig(_run(["ifconfig"]))
        if ports is None:
            ports = parse_hardware_ports(_run(["networksetup", "-listallhardwareports"]))
        classify_macos(found, ports)
    else:
        text = _run(["ip", "-j", "-4", "addr"]) if shutil.which("ip") else ""
        try:
            found = parse_ip_json(text)
        except ValueError:
            found = {}
        if not found:
            found = _interfaces_from_socket()
        for name, iface in found.items():
            if iface["kind"] == "loopback":
                continue
            driver = ""
            try:
                driver = os.path.basename(os.readlink(f"/sys/class/net/{name}/device/driver"))
            except OSError:
                pass
            if name.startswith("thunderbolt") or driver == "thunderbolt-net":
                iface["kind"] = "thunderbolt"
            elif os.path.exists(f"/sys/class/net/{name}/wireless"):
                iface["kind"] = "wifi"
            elif driver:
                iface["kind"] = "ethernet"
    return sorted(found.values(), key=lambda i: i["name"])


def _interfaces_from_socket() -> dict[str, Interface]:
    """Fallback without `ip`: one IPv4 address per interface via the SIOCGIFADDR ioctl."""
    import fcntl
    import struct

    found: dict[str, Interface] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            iface = {"name": name, "kind": "loopback" if name == "lo" else "other", "ipv4": [],
                     "members": [], "up": True}
            try:
                packed = struct.pack("256s", name.encode()[:15])
                addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, packed)[20:24])
                mask = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x891B, packed)[20:24])
                iface["ipv4"].append(f"{addr}/{_mask_bits(mask)}")
            except OSError:
                pass
            found[name] = iface
    return found


def read_battery() -> dict[str, Any] | None:
    """This Mac's battery now (`pmset -g batt`, parsed), or None: not macOS, no battery, or any error.

    Cheap and bounded (BATTERY_TIMEOUT_S), so a running rank can ask between steps.
    """
    if sys.platform != "darwin":
        return None
    try:
        return parse_pmset(_run(["pmset", "-g", "batt"], timeout=BATTERY_TIMEOUT_S))
    except Exception:  # a battery reading must never be why a host fails
        return None


def collect_battery(system: str) -> dict[str, Any] | None:
    """This host's battery for the probe: pmset on macOS, /sys/class/power_supply on Linux."""
    if system == "Darwin":
        return parse_pmset(_run(["pmset", "-g", "batt"]))
    root = "/sys/class/power_supply"
    entries: dict[str, dict[str, str]] = {}
    try:
        names = os.listdir(root)
    except OSError:
        return None
    for name in names:
        entries[name] = {f: _read(os.path.join(root, name, f)).strip()
                         for f in ("type", "capacity", "status", "online")
                         if os.path.exists(os.path.join(root, name, f))}
    return parse_power_supply(entries)


def start_mlx_check() -> subprocess.Popen | None:
    """Import MLX in a child process (started early, read last): a broken install cannot kill the probe."""
    try:
        return subprocess.Popen([sys.executable, "-c", _MLX_CHECK], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except OSError:
        return None


def finish_mlx_check(proc: subprocess.Popen | None) -> dict[str, Any]:
    if proc is None:
        return {"version": None, "device": None, "error": f"could not start {sys.executable}"}
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"version": None, "device": None, "error": "import mlx.core took more than 60 s"}
    if proc.returncode == 0:
        try:
            result = json.loads(out.decode().strip().splitlines()[-1])
            result["error"] = None
            return result
        except (ValueError, IndexError):
            pass
    lines = err.decode("utf-8", "replace").strip().splitlines()
    reason = lines[-1] if lines else f"import mlx.core failed with exit status {proc.returncode}"
    return {"version": None, "device": None, "error": reason}


# RDMA over Thunderbolt (macOS 26.2+): the verbs devices, their port states, and which Thunderbolt port
# faces which Mac. Started together at the start of the probe and read at its end, so they add no time.
RDMA_COMMANDS = {"ibv_devices": ["ibv_devices"], "ibv_devinfo": ["ibv_devinfo"],
                 "thunderbolt": ["system_profiler", "SPThunderboltDataType", "-json"]}
RDMA_TIMEOUT_S = 5.0  # system_profiler can take a second or two on a Mac that just woke up
RDMA_MAX_CHARS = 256 * 1024  # a Mac Studio's six ports print a few kB; more is not these commands' output


def start_rdma_commands(system: str) -> dict[str, Any]:
    """On macOS, start the RDMA commands (read by finish_rdma_commands); nothing elsewhere."""
    if system != "Darwin":
        return {}
    started: dict[str, Any] = {}
    for key, argv in RDMA_COMMANDS.items():
        try:
            started[key] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        except OSError as exc:  # not installed (before macOS 26.2), not executable, ...
            started[key] = f"{argv[0]} did not start: {exc.strerror or exc}"
    return started


def finish_rdma_commands(started: dict[str, Any], hardware_ports: dict[str, str],
                         timeout: float = RDMA_TIMEOUT_S) -> dict[str, Any]:
    """The raw outputs, {} off macOS: {command key: text, "hardware_ports": {...}, "notes": [why empty]}.

    Never raises: a missing command, a hung one (killed after `timeout` s) or a failing one gives "" and
    a note, so a Mac without RDMA is reported, not lost.
    """
    if not started:
        return {}
    found: dict[str, Any] = {"hardware_ports": hardware_ports, "notes": []}
    deadline = time.monotonic() + timeout
    for key, proc in started.items():
        found[key] = ""
        if isinstance(proc, str):
            found["notes"].append(proc)
            continue
        if key == "thunderbolt" and not _lists_devices(found.get("ibv_devices", "")):
            # No RDMA device: the cable map would serve nothing, and system_profiler can take a second or
            # more. Every launch waits for the probe, so stop it rather than wait for it.
            proc.kill()
            proc.communicate()
            continue
        name = RDMA_COMMANDS[key][0]
        try:
            out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            found["notes"].append(f"{name} took more than {timeout:g} s")
            continue
        except OSError as exc:
            found["notes"].append(f"{name} failed: {exc}")
            continue
        found[key] = out.decode("utf-8", "replace")[:RDMA_MAX_CHARS]
        if proc.returncode != 0 and not found[key].strip():
            found["notes"].append(f"{name} exited with status {proc.returncode}")
    return found


def _lists_devices(ibv_devices: str) -> bool:
    """Whether `ibv_devices` output names at least one device (below its two header lines)."""
    return any(line.split() and not line.lstrip().startswith(("device", "------"))
               for line in ibv_devices.splitlines())


# Debian/Ubuntu's threaded OpenBLAS. MLX's Linux CPU build ships a reference BLAS; preloading this one
# made a small GPT's training 7x faster with identical losses (DESIGN.md, "MLX on Linux").
OPENBLAS_PATHS = ("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
                  "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0")


def find_openblas(system: str) -> str | None:
    """The OpenBLAS to preload for MLX on a Linux host, if one is installed (never on macOS)."""
    if system != "Linux":
        return None
    for path in OPENBLAS_PATHS:
        if os.path.exists(path):
            return path
    return None


def mlx_fingerprint() -> str | None:
    """Sizes and mtimes of this interpreter and of MLX's package files, hashed: changes with any reinstall.

    Found without importing MLX (find_spec of a top-level package runs none of its code); None without MLX.
    """
    import hashlib
    import importlib.util

    try:
        spec = importlib.util.find_spec("mlx")
    except (ImportError, ValueError):
        return None
    folders = list(spec.submodule_search_locations or []) if spec else []
    if not folders:
        return None
    parts = []
    files = [os.path.join(d, n) for d in folders for n in sorted(os.listdir(d)) if n != "__pycache__"]
    for path in [os.path.realpath(sys.executable)] + files:  # (importing writes __pycache__: not a change)
        try:
            st = os.stat(path)
        except OSError:
            continue
        parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


# Ports the launcher names for MLX's ring are bound by the ranks only a second or two later. A port the kernel
# hands out for outgoing connections (the ephemeral range) can be taken in between by any connect() on the
# host, and the rank then fails with "Couldn't bind socket (error: 98)"; so they are chosen just below it.
EPHEMERAL_FIRST = {"Linux": 32768, "Darwin": 49152}  # the kernels' defaults, when the live value is unknown
LISTEN_SPAN = 12000  # how far below the ephemeral range to look


def ephemeral_first() -> int:
    """The first port this host's kernel uses for outgoing connections."""
    system = platform.system()
    text = _read("/proc/sys/net/ipv4/ip_local_port_range") if system == "Linux" else \
        _run(["sysctl", "-n", "net.inet.ip.portrange.first"]) if system == "Darwin" else ""
    fields = text.split()
    return int(fields[0]) if fields and fields[0].isdigit() else EPHEMERAL_FIRST.get(system, 32768)


def free_ports(count: int, host: str = "0.0.0.0") -> list[int]:
    """`count` TCP ports free on this host now, below the ephemeral range where possible (see above); held
    open together while chosen, so they differ."""
    import random

    if count <= 0:
        return []
    top = ephemeral_first()
    low = max(1024, top - LISTEN_SPAN)
    held: list[socket.socket] = []
    try:
        for port in random.sample(range(low, top), min(top - low, 40 * count)) if top > low else []:
            s = socket.socket()
            try:
                s.bind((host, port))
            except OSError:
                s.close()
                continue
            held.append(s)
            if len(held) == count:
                break
        while len(held) < count:  # a crowded range: whatever the kernel gives
            s = socket.socket()
            s.bind((host, 0))
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def collect(workdir: str, known_mlx: str | None = None, ports: int = 0) -> dict[str, Any]:
    """Everything the launcher's preflight needs to know about this host, and `ports` free TCP ports.

    With `known_mlx` equal to this host's mlx_fingerprint(), MLX is not imported: the launcher holds that
    answer already (launcher/room/probecache.py), and "mlx" only says so. Asking for the ports here saves the
    launcher a second remote command (a session and an interpreter start) per host.
    """
    fingerprint = mlx_fingerprint()
    cached = fingerprint is not None and fingerprint == known_mlx
    mlx_proc = None if cached else start_mlx_check()
    system = platform.system()
    rdma_procs = start_rdma_commands(system)
    hardware_ports: dict[str, str] | None = None
    if system == "Darwin":
        hardware_ports = parse_hardware_ports(_run(["networksetup", "-listallhardwareports"]))
        os_version = platform.mac_ver()[0]
        chip = _run(["sysctl", "-n", "machdep.cpu.brand_string"]).strip()
        memory = int(_run(["sysctl", "-n", "hw.memsize"]).strip() or 0)
    else:
        os_version = parse_os_release(_read("/etc/os-release")) or platform.release()
        chip = parse_cpuinfo(_read("/proc/cpuinfo"))
        memory = parse_meminfo(_read("/proc/meminfo"))
    disk_path = nearest_existing(workdir)
    try:
        disk_free = shutil.disk_usage(disk_path).free
    except OSError:
        disk_free = -1
    return {
        "hostname": socket.gethostname(),
        "python_version": platform.python_version(),
        "python_executable": sys.executable,
        "os_name": system,
        "os_version": os_version,
        "machine": platform.machine(),
        "chip": chip or platform.processor(),
        "memory_bytes": memory,
        "cpu_count": os.cpu_count() or 0,
        "workdir": workdir,
        "disk_path": disk_path,
        "disk_free_bytes": disk_free,
        "battery": collect_battery(system),
        "interfaces": collect_interfaces(system, hardware_ports),
        "mlx": {"cached": True} if cached else finish_mlx_check(mlx_proc),
        "mlx_fingerprint": fingerprint,
        "free_ports": free_ports(ports),
        "openblas": find_openblas(system),
        "rdma": finish_rdma_commands(rdma_procs, hardware_ports or {}),
    }


def main(argv: list[str]) -> int:
    """probe.py [WORKDIR [MLX_FINGERPRINT|- [PORTS]]]"""
    workdir = argv[1] if len(argv) > 1 else "~"
    known = argv[2] if len(argv) > 2 and argv[2] != "-" else None
    print(json.dumps(collect(workdir, known, int(argv[3]) if len(argv) > 3 else 0), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
