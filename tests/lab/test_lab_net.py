"""The lab itself: sshd on every host, thunderbolt topology, shaped rates, mDNS, and a clean teardown."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import paramiko
import pytest

from tests.lab import labsetup
from tests.lab.labnet import Lab, LabHost, netns_pids, ring_pairs, session_prefix, wait_until

RECEIVER = r"""
import json, socket, sys, time
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(1)
print("ready", flush=True)
conn, _ = srv.accept()
buf = bytearray(1 << 20)
total, first, last = 0, None, None
while n := conn.recv_into(buf):
    last = time.monotonic()
    if first is None:
        first = last  # the clock starts at the first byte; that chunk is not counted
    else:
        total += n
print(json.dumps({"bytes": total, "seconds": last - first}), flush=True)
"""

SENDER = r"""
import socket, sys, time
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
chunk = b"x" * (256 * 1024)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    sock.sendall(chunk)
sock.close()
"""


# ---- pure topology (no root needed, but they live with the lab) -------------------------------------------
def test_ring_pairs_make_a_ring_for_three_or_more_and_one_link_for_two() -> None:
    assert ring_pairs(1) == []
    assert ring_pairs(2) == [(0, 1)]
    assert ring_pairs(3) == [(0, 1), (1, 2), (2, 0)]
    assert ring_pairs(4) == [(0, 1), (1, 2), (2, 3), (3, 0)]


def test_tbf_bucket_holds_a_tick_of_bytes() -> None:
    assert labsetup._rate_bits("200mbit") == 200_000_000
    assert labsetup._rate_bits("10gbit") == 10_000_000_000
    assert labsetup._rate_bits("1mbps") == 8_000_000
    burst = int(labsetup._tbf_args("10gbit", latency_ms=10).split("burst ")[1].split()[0])
    assert burst >= 10_000_000_000 // 8 // labsetup.HZ
    with pytest.raises(ValueError):
        labsetup._rate_bits("fast")


# ---- the session lab --------------------------------------------------------------------------------------
def _ssh(lab: Lab, host: LabHost) -> paramiko.SSHClient:
    known_hosts = lab.ssh_home / ".ssh" / "known_hosts"
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())  # the lab's known_hosts must suffice
    sock = socket.create_connection((host.wifi_ip, host.ssh_port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.connect(host.wifi_ip, host.ssh_port, username="root", sock=sock, look_for_keys=False,
                   key_filename=str(lab.ssh_home / ".ssh" / "id_ed25519"), allow_agent=False, timeout=5)
    return client


def _run(client: paramiko.SSHClient, command: str) -> str:
    _, stdout, stderr = client.exec_command(command, timeout=30)
    out = stdout.read().decode()
    assert stdout.channel.recv_exit_status() == 0, stderr.read().decode()
    return out


def test_every_host_serves_ssh_over_wifi_with_its_own_home_and_no_macrun(lab: Lab) -> None:
    probe = ("import importlib.util as u, mlx.core as mx; "
             "print(u.find_spec('launcher'), u.find_spec('distributed'), mx.array([2, 3]).sum().item())")
    for host in lab.hosts:
        client = _ssh(lab, host)
        try:
            assert host.wifi_ip in _run(client, "ip -4 -o addr show dev wifi0")
            assert _run(client, "hostname").strip() == host.name
            _run(client, f"echo {host.name} > ~/whoami")
            assert _run(client, f"{host.python} -c \"{probe}\"").split() == ["None", "None", "5"]
        finally:
            client.close()
    for host in lab.hosts:  # each host wrote into its own home, and only there
        assert (host.home / "whoami").read_text().strip() == host.name
        assert host.workdir.is_dir()


def test_thunderbolt_neighbours_reach_each_other_only_over_their_link(lab: Lab) -> None:
    connect = "import socket, sys; socket.create_connection((sys.argv[1], 22), timeout=3).close()"
    for host in lab.hosts:
        assert set(host.tb) == {"thunderbolt0", "thunderbolt1"}
        for iface, peer_ip in host.tb_peers.items():
            out = lab.exec(host, [host.python, "-c", connect, peer_ip])
            assert out.returncode == 0, f"{host.name} {iface} -> {peer_ip}: {out.stderr}"
            route = lab.exec(host, ["ip", "-o", "route", "get", peer_ip]).stdout
            assert f"dev {iface}" in route


def test_non_neighbours_have_no_thunderbolt_link_and_two_hosts_have_one(tmp_path: Path) -> None:
    lab4 = Lab.up(4, prefix=session_prefix(1), state_dir=tmp_path / "lab4")
    try:
        h0, h2 = lab4.hosts[0], lab4.hosts[2]
        assert sorted(h0.tb_neighbours.values()) == ["h1", "h3"]
        for ip in h2.tb.values():
            out = lab4.exec(h0, ["ip", "-o", "route", "get", ip])
            assert out.returncode != 0 and "unreachable" in out.stderr  # no route: no link to h2
    finally:
        lab4.down()
    lab2 = Lab.up(2, prefix=session_prefix(1), state_dir=tmp_path / "lab2")
    try:
        a, b = lab2.hosts
        assert list(a.tb) == ["thunderbolt0"] and list(b.tb) == ["thunderbolt1"]
        assert a.tb_peers["thunderbolt0"] == b.tb["thunderbolt1"]
        links = lab2.exec(a, ["ip", "-o", "link"]).stdout
        assert "thunderbolt1" not in links
    finally:
        lab2.down()


def _start_receiver(lab: Lab, host: LabHost | None, ip: str, port: int) -> subprocess.Popen[str]:
    argv = [host.python if host else sys.executable, "-c", RECEIVER, ip, str(port)]
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    proc = lab.popen(host, argv, **kw) if host else subprocess.Popen(argv, **kw)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _start_sender(lab: Lab, host: LabHost | None, ip: str, port: int, seconds: float
                  ) -> subprocess.Popen[Any]:
    argv = [host.python if host else sys.executable, "-c", SENDER, ip, str(port), str(seconds)]
    return lab.popen(host, argv, text=True) if host else subprocess.Popen(argv, text=True)


def _mbit(receiver: subprocess.Popen[str]) -> float:
    out, err = receiver.communicate(timeout=30)
    assert receiver.returncode == 0, err
    result = json.loads(out)
    return result["bytes"] * 8 / result["seconds"] / 1e6


Flow = tuple["LabHost | None", "LabHost | None", str]


def _measure(lab: Lab, flows: list[Flow], seconds: float) -> list[float]:
    """Run (sender, receiver, receiver ip) flows at once (None: the master); Mbit/s of each."""
    receivers = [_start_receiver(lab, dst, ip, 45_000 + i) for i, (_, dst, ip) in enumerate(flows)]
    senders = [_start_sender(lab, src, ip, 45_000 + i, seconds) for i, (src, _, ip) in enumerate(flows)]
    rates = [_mbit(r) for r in receivers]
    for s in senders:
        assert s.wait(timeout=30) == 0
    return rates


def test_wifi_is_shaped_to_its_rate_and_shared_while_thunderbolt_is_much_faster(lab: Lab) -> None:
    h0, h1, h2 = lab.hosts
    wifi = labsetup._rate_bits(lab.wifi_rate) / 1e6
    [alone] = _measure(lab, [(h0, h1, h1.wifi_ip)], seconds=1.5)
    # Upper bounds are the shaper's; lower bounds leave room for Python senders starved of CPU on 2 busy cores.
    assert 0.7 * wifi <= alone <= 1.15 * wifi, f"one Wi-Fi flow: {alone:.0f} Mbit/s, shaped to {wifi:.0f}"
    [from_master] = _measure(lab, [(None, h2, h2.wifi_ip)], seconds=1.0)
    assert 0.7 * wifi <= from_master <= 1.15 * wifi, f"master -> h2: {from_master:.0f} Mbit/s"

    # Two flows between different pairs (one into the master) share the one segment, each station
    # getting about half, like Wi-Fi airtime. Each rate is taken over its own receiver's window and the two
    # never start at the same instant, so their sum may pass the segment's rate a little.
    shared = _measure(lab, [(h0, h1, h1.wifi_ip), (h2, None, lab.master_ip)], seconds=1.5)
    assert 0.6 * wifi <= sum(shared) <= 1.25 * wifi, f"two Wi-Fi flows: {shared} Mbit/s"
    assert max(shared) < 0.75 * wifi, f"one station took most of the segment: {shared}"

    [tb] = _measure(lab, [(h0, h1, h0.tb_peers["thunderbolt0"])], seconds=1.0)
    assert tb > 3 * alone, f"thunderbolt {tb:.0f} Mbit/s vs Wi-Fi {alone:.0f} Mbit/s"


def test_exec_popen_and_stray_pids_see_the_hosts_processes(lab: Lab) -> None:
    h0, h1 = lab.hosts[:2]
    proc = lab.popen(h1, ["sleep", "60"])
    try:
        wait_until(lambda: proc.pid in lab.stray_pids(h1), 5, "sleep to show up in h1's namespace")
        assert proc.pid not in lab.pids(h0)
        assert h1.sshd_pid in lab.pids(h1) and h1.sshd_pid not in lab.stray_pids(h1)
    finally:
        proc.kill()
        proc.wait()
    assert proc.pid not in lab.pids(h1)
    assert lab.exec(h0, ["sh", "-c", "echo $HOME; pwd"], cwd=h0.workdir).stdout.split() == [
        "/root", str(h0.workdir)]


def test_hosts_file_lists_every_host_and_loads(lab: Lab, tmp_path: Path) -> None:
    path = lab.write_hosts_file(tmp_path / "hosts.json", slots=2, hosts=[0, 2],
                                fast_ips=lambda h: list(h.tb.values()))
    entries = json.loads(path.read_text())["hosts"]
    assert [e["host"] for e in entries] == [lab.hosts[0].wifi_ip, lab.hosts[2].wifi_ip]
    assert all(e["slots"] == 2 and e["user"] == "root" for e in entries)
    assert entries[1]["fast_ips"] == list(lab.hosts[2].tb.values())
    hosts = pytest.importorskip("launcher.room.hosts")
    if not hasattr(hosts, "load_hosts"):
        pytest.skip("launcher.room.hosts.load_hosts not written yet")
    specs = hosts.load_hosts(path)
    assert [s.hostname for s in specs] == [lab.hosts[0].wifi_ip, lab.hosts[2].wifi_ip]
    assert [s.python for s in specs] == [lab.hosts[0].python, lab.hosts[2].python]


def test_mdns_browse_from_the_master_finds_every_host(lab: Lab) -> None:
    from zeroconf import IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf

    seen: dict[str, set[str]] = {"_ssh._tcp.local.": set(), "_device-info._tcp.local.": set()}

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Added:
            seen[service_type].add(name)

    zc = Zeroconf(interfaces=[lab.master_ip], ip_version=IPVersion.V4Only)
    try:
        browsers = [ServiceBrowser(zc, t, handlers=[on_change]) for t in seen]
        want = {h.mdns_name for h in lab.hosts}
        wait_until(lambda: all({n.split(".")[0] for n in names} >= want for names in seen.values()), 10,
                   "every lab host over mDNS")
        for host in lab.hosts:
            ssh = zc.get_service_info("_ssh._tcp.local.", f"{host.mdns_name}._ssh._tcp.local.", timeout=3000)
            assert ssh is not None and ssh.port == 22 and ssh.parsed_addresses() == [host.wifi_ip]
            info = zc.get_service_info("_device-info._tcp.local.",
                                       f"{host.mdns_name}._device-info._tcp.local.", timeout=3000)
            assert info is not None and info.properties.get(b"model") == b"Mac16,10"
        for b in browsers:
            b.cancel()
    finally:
        zc.close()


# ---- teardown ---------------------------------------------------------------------------------------------
def test_down_and_cleanup_stale_leave_nothing_behind(tmp_path: Path) -> None:
    def leftovers(prefix: str) -> list[str]:
        return labsetup.list_namespaces(prefix) + labsetup.list_links(prefix)

    prefix = session_prefix(2)
    lab = Lab.up(2, prefix=prefix, state_dir=tmp_path / "state")
    assert all(Path(p).read_text().strip() == "0" for p in lab.sysctls)
    sshd = lab.hosts[0].sshd_pid
    stray = lab.popen(lab.hosts[1], ["sleep", "60"])
    assert sorted(leftovers(prefix)) == [f"{prefix}-{n}" for n in ("air", "br", "h0", "h0w", "h1", "h1w")]
    lab.down()
    lab.down()  # idempotent
    assert stray.wait(timeout=5) != 0  # killed with its namespace
    assert leftovers(prefix) == [] and netns_pids(f"{prefix}-h1") == []
    assert not Path(f"/proc/{sshd}").exists()

    # A crashed run: the lab is never taken down; the next one's cleanup_stale removes it all.
    crashed = Lab.up(2, prefix=prefix, state_dir=tmp_path / "state")
    assert Lab.cleanup_stale(prefix, tmp_path / "state") is True
    assert leftovers(prefix) == []
    assert crashed._sshds[0].process.wait(timeout=5) is not None  # killed (and now reaped)
    if not any(n.endswith("-air") for n in labsetup._all_links()):  # no other lab up: sysctls restored
        assert not labsetup.SYSCTL_SAVE.exists()
        for path, value in crashed.sysctls.items():
            assert Path(path).read_text().strip() == value


def test_a_host_can_run_another_python_without_mlx(tmp_path: Path) -> None:
    bare = getattr(sys, "_base_executable", sys.executable)
    if subprocess.run([bare, "-c", "import mlx"], capture_output=True).returncode == 0:
        pytest.skip("no interpreter without MLX on this machine (tests run outside a venv)")
    lab1 = Lab.up(1, thunderbolt=False, prefix=session_prefix(3), state_dir=tmp_path / "lab1",
                  host_python=bare)
    try:
        [host] = lab1.hosts
        assert host.python == bare and host.tb == {}
        out = lab1.exec(host, [host.python, "-c", "import mlx"])
        assert out.returncode == 1 and "No module named 'mlx'" in out.stderr
        entry = json.loads((lab1.state_dir / "hosts.json").read_text())["hosts"][0]
        assert entry["python"] == bare
    finally:
        lab1.down()
