"""Preflight: the probe over real SSH on loopback, checks on synthetic facts, parsers on recorded output."""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import pytest
from rich.console import Console

from distributed import probe
from distributed.errors import HostError
from launcher.room import preflight
from launcher.room.hosts import HostSpec
from launcher.room.preflight import HostFacts, InterfaceFacts
from launcher.transport import ssh
from tests.support.recorded import MAC_PORTS
from tests.support.sshd import SshdHandle, requires_openssh

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = str(REPO / ".venv" / "bin" / "python")
PLAIN_PYTHON = "/root/.pyenv/versions/3.11.7/bin/python3"  # a Python without MLX
OLD_PYTHON = "/root/.pyenv/versions/3.9.18/bin/python3"  # macOS system Python's version

needs_sshd = requires_openssh


@pytest.fixture
def connect(server: SshdHandle, ssh_home: Path, tmp_path: Path) -> Iterator[object]:
    """connect(name, python) -> SSHConnection to the loopback sshd, HOME isolated; all closed after."""
    handle = server
    opened: list[ssh.SSHConnection] = []

    def open_one(name: str, python: str) -> ssh.SSHConnection:
        spec = HostSpec(name=name, hostname=handle.host, port=handle.port, python=python,
                        workdir=str(tmp_path / "work" / name))
        opened.append(ssh.connect(spec))
        return opened[-1]

    yield open_one
    for c in opened:
        c.close()


def has_mlx(python: str) -> bool:
    return subprocess.run([python, "-c", "import mlx.core"], capture_output=True).returncode == 0


# ---- probing real hosts over SSH --------------------------------------------------------------

@pytest.mark.integration
@needs_sshd
def test_probe_loopback_host(connect) -> None:  # type: ignore[no-untyped-def]
    conn = connect("loop", VENV_PYTHON)
    started = time.perf_counter()
    facts = preflight.probe_hosts([conn])
    elapsed = time.perf_counter() - started
    f = facts["loop"]
    assert f.mlx_version == mx.__version__ and f.mlx_error is None
    assert f.python_executable.startswith(str(REPO / ".venv"))
    assert f.memory_bytes > 2**20 and f.cpu_count >= 1 and f.disk_free_bytes > 0
    assert f.disk_path == "/tmp" or Path(f.disk_path).exists()  # the work dir does not exist yet
    lo = {i.name: i for i in f.interfaces}["lo"]
    assert lo.kind == "loopback" and "127.0.0.1" in lo.addresses
    assert preflight.check_hosts(facts, local_mlx=mx.__version__) == []
    assert elapsed < 30
    print(f"probe of 1 loopback host: {elapsed * 1e3:.0f} ms (probe command {f.probe_seconds * 1e3:.0f} ms)")


@pytest.mark.integration
@needs_sshd
def test_host_without_mlx_is_an_error_naming_it(connect) -> None:  # type: ignore[no-untyped-def]
    if not Path(PLAIN_PYTHON).exists() or has_mlx(PLAIN_PYTHON):
        pytest.skip(f"needs {PLAIN_PYTHON} without MLX")
    conns = [connect("studio", VENV_PYTHON), connect("laptop", PLAIN_PYTHON)]
    with pytest.raises(HostError) as err:
        preflight.run_preflight(conns, local_mlx=mx.__version__)
    assert err.value.message.startswith("MLX does not import on laptop")
    assert "No module named 'mlx'" in err.value.message and "studio" not in err.value.message
    assert f"{PLAIN_PYTHON} -m pip install 'mlx[cpu]=={mx.__version__}'" in (err.value.hint or "")
    assert "hosts.json" in (err.value.hint or "")


@pytest.mark.integration
@needs_sshd
def test_missing_interpreter_is_named(connect) -> None:  # type: ignore[no-untyped-def]
    conn = connect("mini", "/nonexistent/python3")
    with pytest.raises(HostError, match=r"mini .*'/nonexistent/python3' not found"):
        preflight.probe_hosts([conn])


@pytest.mark.integration
@pytest.mark.skipif(not Path(OLD_PYTHON).exists(), reason=f"needs {OLD_PYTHON}")
def test_probe_runs_on_python_39() -> None:
    script = (REPO / "distributed" / "probe.py").read_bytes()
    out = subprocess.run([OLD_PYTHON, "-", "/nonexistent/work"], input=script, capture_output=True,
                         check=True, timeout=60)
    data = json.loads(out.stdout)
    assert data["python_version"].startswith("3.9.") and data["disk_path"] == "/"
    facts = HostFacts.from_probe("old", data, 0.1)
    messages = [p.message for p in preflight.check_hosts({"old": facts}, local_mlx=None)]
    assert any("Python 3.9" in m and "3.10 or newer" in m for m in messages)


def test_probe_imports_only_the_standard_library() -> None:
    tree = ast.parse((REPO / "distributed" / "probe.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= set(sys.stdlib_module_names) | {"__future__"}


# ---- checks on synthetic facts ----------------------------------------------------------------

def make_facts(name: str, **changes: object) -> HostFacts:
    base = HostFacts(
        name=name, hostname=f"{name}.local", python_version="3.12.4",
        python_executable="/opt/homebrew/bin/python3", os_name="Darwin", os_version="14.5", machine="arm64",
        chip="Apple M2 Max", memory_bytes=64 * 2**30, cpu_count=12, disk_path="/Users/me",
        disk_free_bytes=400 * 2**30, battery_percent=None, on_ac=None, mlx_version="0.25.2", mlx_error=None,
        mlx_device="Device(gpu, 0)",
        interfaces=(InterfaceFacts("lo0", "loopback", ("127.0.0.1/8",)),
                    InterfaceFacts("bridge0", "thunderbolt", ("169.254.10.2/16",), ("en1", "en2"))),
        probe_seconds=0.2)
    return replace(base, **changes)  # type: ignore[arg-type]


def test_mlx_versions_that_differ_are_one_error() -> None:
    facts = {"a": make_facts("a"), "b": make_facts("b", mlx_version="0.26.0"), "c": make_facts("c")}
    problems = preflight.check_hosts(facts, local_mlx=None)
    assert [p.severity for p in problems] == ["error"]
    assert "a 0.25.2" in problems[0].message and "b 0.26.0" in problems[0].message
    assert "pip install mlx==0.25.2" in (problems[0].hint or "")  # the majority's version
    chosen = preflight.check_hosts(facts, local_mlx="0.26.0")[0]
    assert "pip install mlx==0.26.0" in (chosen.hint or "")  # this machine's version, when a host has it
    with pytest.raises(HostError, match="MLX versions differ"):
        preflight.raise_for_problems(problems)


def test_missing_mlx_comes_before_other_errors() -> None:
    facts = {"a": make_facts("a", python_version="3.9.6"),
             "b": make_facts("b", mlx_version=None, mlx_error="ModuleNotFoundError: No module named 'mlx'")}
    problems = preflight.check_hosts(facts, local_mlx=None)
    assert problems[0].message.startswith("MLX does not import on b")
    assert "/opt/homebrew/bin/python3 -m pip install mlx==0.25.2" in (problems[0].hint or "")
    assert any("Python 3.9.6" in p.message for p in problems[1:])
    with pytest.raises(HostError, match=r"^MLX does not import on b.*\(and 1 more"):
        preflight.raise_for_problems(problems)


def test_battery_and_low_disk_are_warnings_only() -> None:
    facts = {"a": make_facts("a", battery_percent=20, on_ac=False, disk_free_bytes=2**30),
             "b": make_facts("b", battery_percent=90, on_ac=True)}
    problems = preflight.check_hosts(facts, local_mlx="0.25.2")
    assert {(p.host, p.severity) for p in problems} == {("a", "warning")}
    assert any("on battery (20%), low" in p.message for p in problems)
    assert any("1.0 GiB free" in p.message for p in problems)
    preflight.raise_for_problems(problems)  # warnings do not stop a launch


def test_on_battery_below_min_battery_stops_the_launch() -> None:
    facts = {"air": make_facts("air", battery_percent=12, on_ac=False),
             "pro": make_facts("pro", battery_percent=25, on_ac=False)}
    problems = preflight.check_hosts(facts, local_mlx="0.25.2")
    assert [(p.host, p.severity, p.message) for p in problems] == [
        ("air", "error", "air is on battery at 12% (below fault.min_battery 20%)"),
        ("pro", "warning", "pro is on battery (25%), low")]  # above the minimum: a warning, as before
    assert problems[0].hint == "plug air in, or allow it with --set fault.min_battery=0"
    with pytest.raises(HostError, match=r"^air is on battery at 12%") as err:
        preflight.raise_for_problems(problems)
    assert err.value.hint == problems[0].hint
    stricter = preflight.check_hosts(facts, local_mlx="0.25.2", min_battery=50)
    assert [p.severity for p in stricter] == ["error", "error"]
    allowed = preflight.check_hosts(facts, local_mlx="0.25.2", min_battery=0)
    assert [p.severity for p in allowed] == ["warning", "warning"]  # --set fault.min_battery=0


def test_battery_state_travels_from_the_probe() -> None:
    data = {"hostname": "air.local", "python_version": "3.12.4", "python_executable": "/usr/bin/python3",
            "os_name": "Darwin", "os_version": "15.1", "machine": "arm64", "chip": "Apple M3",
            "memory_bytes": 2**34, "cpu_count": 8, "disk_path": "/", "disk_free_bytes": 2**40,
            "battery": probe.parse_pmset(PMSET_BATTERY), "mlx": {"version": "0.25.2"}}
    facts = HostFacts.from_probe("air", data, 0.1)
    assert (facts.battery_percent, facts.on_ac, facts.battery_state) == (76, False, "discharging")
    assert HostFacts.from_probe("studio", {**data, "battery": None}, 0.1).battery_state is None


def test_render_preflight_table() -> None:
    facts = {"studio": make_facts("studio"),
             "air": make_facts("air", battery_percent=55, on_ac=False, mlx_version=None, mlx_error="x")}
    problems = preflight.check_hosts(facts, local_mlx=None)
    console = Console(record=True, width=220, file=io.StringIO())
    console.print(preflight.render_preflight(facts, problems))
    text = console.export_text()
    studio = next(line for line in text.splitlines() if "studio" in line)
    air = next(line for line in text.splitlines() if "air " in line)
    assert "macOS 14.5" in studio and "Apple M2 Max" in studio and "64 GiB" in studio
    assert "bridge0 169.254.10.2" in studio and studio.rstrip(" │").endswith("ok")
    assert "missing" in air and "55% battery" in air and "error" in air


# ---- parsers on recorded output -----------------------------------------------------------------

MAC_IFCONFIG = """\
lo0: flags=8049<UP,LOOPBACK,RUNNING,MULTICAST> mtu 16384
\toptions=1203<RXCSUM,TXCSUM,TXSTATUS,SW_TIMESTAMP>
\tinet 127.0.0.1 netmask 0xff000000
\tinet6 ::1 prefixlen 128
en0: flags=8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST> mtu 1500
\tether 3c:22:fb:00:11:22
\tinet 192.168.1.23 netmask 0xffffff00 broadcast 192.168.1.255
\tstatus: active
en1: flags=8963<UP,BROADCAST,SMART,RUNNING,PROMISC,SIMPLEX,MULTICAST> mtu 1500
\tstatus: active
en2: flags=8963<UP,BROADCAST,SMART,RUNNING,PROMISC,SIMPLEX,MULTICAST> mtu 1500
\tstatus: inactive
bridge0: flags=8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST> mtu 1500
\tConfiguration:
\t\tid 0:0:0:0:0:0 priority 0 hellotime 0 fwddelay 0
\tmember: en1 flags=3<LEARNING,DISCOVER>
\t        ifmaxaddr 0 port 7 priority 0 path cost 0
\tmember: en2 flags=3<LEARNING,DISCOVER>
\t        ifmaxaddr 0 port 8 priority 0 path cost 0
\tinet 169.254.33.7 netmask 0xffff0000 broadcast 169.254.255.255
\tstatus: active
"""


PMSET_BATTERY = ("Now drawing from 'Battery Power'\n"
                 " -InternalBattery-0 (id=23461987)\t76%; discharging; 5:12 remaining present: true\n")
PMSET_AC = ("Now drawing from 'AC Power'\n"
            " -InternalBattery-0 (id=23461987)\t100%; charged; 0:00 remaining present: true\n")
PMSET_DESKTOP = "Now drawing from 'AC Power'\n"

LINUX_IP = json.dumps([
    {"ifindex": 1, "ifname": "lo", "flags": ["LOOPBACK", "UP", "LOWER_UP"],
     "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8}]},
    {"ifindex": 2, "ifname": "wlan0", "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"],
     "addr_info": [{"family": "inet", "local": "10.55.0.2", "prefixlen": 24},
                   {"family": "inet", "local": "10.55.0.9", "prefixlen": 24}]},
    {"ifindex": 3, "ifname": "thunderbolt0", "flags": ["BROADCAST", "UP"],
     "addr_info": [{"family": "inet", "local": "10.77.0.1", "prefixlen": 30}]},
    {"ifindex": 4, "ifname": "docker0", "flags": ["NO-CARRIER", "BROADCAST"], "addr_info": []},
])


def test_parse_macos_ifconfig_and_thunderbolt_bridge() -> None:
    found = probe.parse_ifconfig(MAC_IFCONFIG)
    assert found["lo0"]["kind"] == "loopback" and found["lo0"]["ipv4"] == ["127.0.0.1/8"]
    assert found["en0"]["ipv4"] == ["192.168.1.23/24"]
    assert found["bridge0"]["members"] == ["en1", "en2"] and found["bridge0"]["ipv4"] == ["169.254.33.7/16"]
    ports = probe.parse_hardware_ports(MAC_PORTS)
    assert ports == {"en5": "Ethernet", "bridge0": "Thunderbolt Bridge", "en0": "Wi-Fi",
                     "en1": "Thunderbolt 1", "en2": "Thunderbolt 2"}
    probe.classify_macos(found, ports)
    kinds = {name: i["kind"] for name, i in found.items()}
    assert kinds == {"lo0": "loopback", "en0": "wifi", "en1": "thunderbolt", "en2": "thunderbolt",
                     "bridge0": "thunderbolt"}


def test_parse_pmset() -> None:
    assert probe.parse_pmset(PMSET_BATTERY) == {"percent": 76, "on_ac": False, "state": "discharging"}
    assert probe.parse_pmset(PMSET_AC) == {"percent": 100, "on_ac": True, "state": "charged"}
    assert probe.parse_pmset(PMSET_DESKTOP) is None


def test_parse_linux_outputs() -> None:
    found = probe.parse_ip_json(LINUX_IP)
    assert found["lo"]["kind"] == "loopback"
    assert found["wlan0"]["ipv4"] == ["10.55.0.2/24", "10.55.0.9/24"]
    assert found["thunderbolt0"]["ipv4"] == ["10.77.0.1/30"] and found["docker0"]["up"] is False
    assert probe.parse_meminfo("MemTotal:       16318480 kB\nMemFree:  1 kB\n") == 16318480 * 1024
    assert probe.parse_cpuinfo("processor\t: 0\nmodel name\t: AMD EPYC 7B13\n") == "AMD EPYC 7B13"
    assert probe.parse_os_release('NAME="Debian"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n') == \
        "Debian GNU/Linux 12 (bookworm)"
    laptop = {"BAT0": {"type": "Battery", "capacity": "41", "status": "Discharging"},
              "AC": {"type": "Mains", "online": "0"}}
    assert probe.parse_power_supply(laptop) == {"percent": 41, "on_ac": False, "state": "discharging"}
    assert probe.parse_power_supply({"AC": {"type": "Mains", "online": "1"}}) is None


def test_nearest_existing_parent(tmp_path: Path) -> None:
    assert probe.nearest_existing(str(tmp_path / "a" / "b")) == str(tmp_path)
    assert probe.nearest_existing(str(tmp_path)) == str(tmp_path)


# ---- the probe cache: MLX imported once per install ---------------------------------------------

FAKE_MLX_CORE = "__version__ = {version!r}\n\ndef default_device():\n    return 'Device(fake, 0)'\n"


def test_probe_skips_the_mlx_import_while_the_install_is_unchanged(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "mlx").mkdir(parents=True)
    (site / "mlx" / "__init__.py").write_text("")
    (site / "mlx" / "core.py").write_text(FAKE_MLX_CORE.format(version="9.1"))
    script = (REPO / "distributed" / "probe.py").read_bytes()

    def run(*known: str) -> dict:
        out = subprocess.run([sys.executable, "-", str(tmp_path), *known], input=script, capture_output=True,
                             check=True, timeout=60, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
        return json.loads(out.stdout)

    first = run()
    assert first["mlx"]["version"] == "9.1" and first["mlx_fingerprint"]
    again = run(first["mlx_fingerprint"])
    assert again["mlx"] == {"cached": True} and again["mlx_fingerprint"] == first["mlx_fingerprint"]
    # Reinstalling MLX (another version: other file sizes) changes the fingerprint: the probe imports again.
    (site / "mlx" / "core.py").write_text(FAKE_MLX_CORE.format(version="9.10"))
    upgraded = run(first["mlx_fingerprint"])
    assert upgraded["mlx"]["version"] == "9.10" and upgraded["mlx_fingerprint"] != first["mlx_fingerprint"]
    assert run("not-a-fingerprint")["mlx"]["version"] == "9.10"


@pytest.mark.integration
@needs_sshd
def test_launcher_reuses_the_cached_mlx_answer(connect, tmp_path: Path,  # type: ignore[no-untyped-def]
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.room import probecache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    conn = connect("loop", VENV_PYTHON)
    cold = preflight.probe_host(conn)
    entries = json.loads(probecache.cache_path().read_text())
    assert [e["mlx"]["version"] for e in entries.values()] == [mx.__version__]
    warm = preflight.probe_host(conn)
    assert (warm.mlx_version, warm.mlx_device, warm.mlx_error) == (cold.mlx_version, cold.mlx_device, None)
    # A damaged cache is only a slower probe.
    probecache.cache_path().write_text("{not json")
    assert preflight.probe_host(conn).mlx_version == mx.__version__
    assert json.loads(probecache.cache_path().read_text())  # rewritten


def test_free_ports_are_below_the_ephemeral_range_distinct_and_bindable() -> None:
    # Outgoing connections take ephemeral ports: one could steal a ring port between choosing and binding.
    ports = probe.free_ports(6)
    top = probe.ephemeral_first()
    assert len(set(ports)) == 6 and all(1024 <= p < top for p in ports), (ports, top)
    import socket

    held = [socket.socket() for _ in ports]
    try:
        for s, p in zip(held, ports, strict=True):
            s.bind(("0.0.0.0", p))
    finally:
        for s in held:
            s.close()
