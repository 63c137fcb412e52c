"""`macrun hosts setup-thunderbolt` on three emulated hosts whose Thunderbolt veths start neutral (up, no IPv4):
the cable map found by IPv6 neighbour discovery, a /30 per cable, a second --apply that changes nothing, a
DDP run whose ring goes over those addresses, then --undo back to neutral. The real CLI runs as a subprocess.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.labnet import Lab, LabUnavailable, session_prefix
from tests.lab.scripts.macrun_proc import run_macrun

pytestmark = pytest.mark.timeout(150)

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["model.size=tiny", "data.max_bytes=100000", "data.seq_len=32", "train.batch_size=16", "train.steps=6",
         "train.warmup_steps=2", "train.log_interval=3", "train.eval_interval=6", "train.checkpoint_interval=6",
         "strategy.mode=ddp", "run.name=tb"]


@pytest.fixture
def neutral_lab(tmp_path: Path) -> Iterator[Lab]:
    """A private three-host lab whose cables have no IPv4 address (the session lab's are set up already)."""
    try:
        lab = Lab.up(3, prefix=session_prefix(2), state_dir=tmp_path / "lab", neutral=True)
    except LabUnavailable as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"lab unavailable under CI: {exc}")
        pytest.skip(f"lab unavailable: {exc}")
    try:
        yield lab
    finally:
        lab.down()


def cable_addresses(lab: Lab) -> dict[tuple[str, str], list[str]]:
    """{(host, thunderbolt iface): its IPv4 addresses}, read inside each host's namespace."""
    found = {}
    for h in lab.hosts:
        for entry in json.loads(lab.exec(h, ["ip", "-j", "addr", "show"], check=True).stdout):
            if entry["ifname"].startswith("thunderbolt"):
                found[(h.name, entry["ifname"])] = [f"{a['local']}/{a['prefixlen']}" for a in entry["addr_info"]
                                                    if a["family"] == "inet"]
    return found


def setup(lab: Lab, hosts: Path, cwd: Path, *args: str) -> str:
    done = run_macrun(["hosts", "setup-thunderbolt", "--hosts", str(hosts), *args], home=lab.ssh_home, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    return done.stdout


def test_setup_thunderbolt_from_neutral_then_train_over_the_cables_then_undo(neutral_lab: Lab, tmp_path: Path) -> None:
    lab = neutral_lab
    hosts = lab.write_hosts_file(tmp_path / "hosts.json")
    original = hosts.read_text()
    neutral = cable_addresses(lab)
    assert len(neutral) == 6 and all(v == [] for v in neutral.values()), neutral

    out = setup(lab, hosts, tmp_path, "--apply")
    # The map names each cable's two ends as the lab wired them (hN thunderbolt0 -> h(N+1) thunderbolt1).
    assert "Thunderbolt cables (3, found by IPv6 neighbours):" in out, out
    for h in lab.hosts:
        peer = h.tb_neighbours["thunderbolt0"]
        pair = sorted([(h.name, "thunderbolt0"), (peer, "thunderbolt1")])
        assert re.search(rf"^  {pair[0][0]} {pair[0][1]} \S+  <->  {pair[1][0]} {pair[1][1]} \S+   \[to add\]$",
                         out, re.M), out
    assert "done: 3 of 3 cables have their addresses" in out and "survives a reboot" in out
    applied = cable_addresses(lab)
    for h in lab.hosts:  # both ends of each cable hold one address each, in one /30 of its own
        peer = h.tb_neighbours["thunderbolt0"]
        (mine,), (theirs,) = applied[(h.name, "thunderbolt0")], applied[(peer, "thunderbolt1")]
        net = ipaddress.ip_interface(mine).network
        assert net.prefixlen == 30 and ipaddress.ip_interface(theirs).network == net and mine != theirs
    subnets = {ipaddress.ip_interface(a[0]).network for a in applied.values()}
    assert len(subnets) == 3 and all(not s.overlaps(ipaddress.ip_network(f"{lab.subnet}.0.0/16")) for s in subnets)
    fast = {e["name"]: set(e["fast_ips"]) for e in json.loads(hosts.read_text())["hosts"]}
    assert fast == {h.name: {applied[(h.name, i)][0].split("/")[0] for i in h.tb} for h in lab.hosts}
    written = hosts.read_text()

    again = setup(lab, hosts, tmp_path, "--apply")
    assert "nothing to change: every cable already has its address" in again and again.count("[in place]") == 3
    assert cable_addresses(lab) == applied and hosts.read_text() == written  # nothing touched, file included

    trained = run_macrun(["train", "--hosts", str(hosts),
                          str(ROOT / "configs" / "quickstart.yaml"), *[x for s in TRAIN for x in ("--set", s)]],
                         home=lab.ssh_home, cwd=tmp_path, timeout=110)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    ring = re.search(r"^ring over Thunderbolt: h0 (\S+) → h\d (\S+) → h\d (\S+) → h0$", trained.stdout, re.M)
    assert ring, trained.stdout
    cable_ips = {a[0].split("/")[0] for a in applied.values()}
    assert set(ring.groups()) <= cable_ips, (ring.groups(), cable_ips)
    assert "done: step 6" in trained.stdout, trained.stdout

    undone = setup(lab, hosts, tmp_path, "--undo")
    assert "undone: 6 changes on 3 hosts" in undone, undone
    assert cable_addresses(lab) == neutral and hosts.read_text().strip() == original.strip()
    assert "nothing to undo" in setup(lab, hosts, tmp_path, "--undo")
