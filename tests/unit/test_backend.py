"""Choosing the backend (ring, jaccl, jaccl-ring) from recorded-format Mac output, and the env a jaccl rank gets.

The rooms are built by tests/support/recorded_rdma.py: Macs, the cables between them, and what each Mac's
`ibv_devices`, `ibv_devinfo`, `system_profiler SPThunderboltDataType -json` and networksetup print.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distributed.config import load_config
from distributed.env import RankEnv
from distributed.errors import ConfigError, EnvContractError, HostError, UsageError
from launcher.cli import app
from launcher.jobs.api import LaunchSpec, launch
from launcher.room.preflight import InterfaceFacts
from launcher.thunderbolt.backend import CABLE_HINT, BackendHost, check_backend, choose_backend, pick_coordinator
from launcher.thunderbolt.rdma import RdmaFacts
from tests.support.recorded_rdma import Mac, Room

ENABLE = "run `rdma_ctl enable` in recovery mode on macOS 26.2+"


def lan(i: int, *, bridge: bool = False, extra: Sequence[InterfaceFacts] = ()) -> tuple[InterfaceFacts, ...]:
    """A Mac's interfaces: loopback, Ethernet on the room's LAN, a Thunderbolt Bridge (up only if `bridge`)."""
    return (InterfaceFacts("lo0", "loopback", ("127.0.0.1/8",)),
            InterfaceFacts("en0", "ethernet", (f"192.168.1.{10 + i}/24",)),
            InterfaceFacts("bridge0", "thunderbolt", (f"169.254.7.{i + 1}/16",), ("en2", "en3"), up=bridge),
            *extra)


def macs(room: Room, order: Sequence[str] | None = None, *, bridge: Sequence[str] = (), version: str = "26.2",
         slots: dict[str, int] | None = None) -> list[BackendHost]:
    names = list(order or room.macs)
    return [BackendHost(n, "Darwin", version, (slots or {}).get(n, 1), RdmaFacts.from_probe(room.raw(n)),
                        lan(i, bridge=n in bridge), f"192.168.1.{10 + i}") for i, n in enumerate(names)]


def expected_mesh(room: Room, names: Sequence[str]) -> list[list[str | None]]:
    return [[None if a == b else f"rdma_{room.port_to(a, b)}" for b in names] for a in names]


# ---- full meshes -> jaccl -------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 4])
def test_full_mesh_of_n_macs_chooses_jaccl_with_the_device_matrix(n: int) -> None:
    names = [f"studio{i}" for i in range(1, n + 1)]
    room = Room.of(*names).mesh()
    choice = choose_backend("auto", macs(room))
    assert choice.name == "jaccl" and choice.order == tuple(names)
    assert choice.describe() == f"backend jaccl: RDMA over Thunderbolt between every pair of the {n} Macs (full mesh)"
    assert json.loads(choice.devices_json()) == expected_mesh(room, names)
    assert choose_backend("jaccl", macs(room)) == choice


def test_three_mac_matrix_is_exactly_mlx_format() -> None:
    # cables in the order a-b, a-c, b-c: each Mac's first port (en2) and second port (en3)
    choice = choose_backend("auto", macs(Room.of("a", "b", "c").mesh()))
    assert choice.devices_json() == ('[[null, "rdma_en2", "rdma_en3"], ["rdma_en2", null, "rdma_en3"], '
                                     '["rdma_en2", "rdma_en3", null]]')


def test_renamed_rdma_devices_are_each_macs_own() -> None:
    # Extra Ethernet ports move the Thunderbolt devices: m2's are en5.., m3's en8..; the cable from m1's en2
    # lands on m2's en5, and the matrix must name the device at each end, not assume they match.
    room = Room(Mac("m1"), Mac("m2", first_en=5), Mac("m3", first_en=8)).mesh()
    choice = choose_backend("auto", macs(room))
    assert choice.devices == ((None, "rdma_en2", "rdma_en3"), ("rdma_en5", None, "rdma_en6"),
                              ("rdma_en8", "rdma_en9", None))


# ---- a ring of cables -> jaccl-ring -----------------------------------------------------------------

def ring_room() -> Room:
    return Room.of("m1", "m2", "m3", "m4").cable("m1", "m2").cable("m2", "m3").cable("m3", "m4").cable("m4", "m1")


def test_four_macs_cabled_as_a_ring_choose_jaccl_ring_with_neighbours_only() -> None:
    room = ring_room()
    choice = choose_backend("auto", macs(room, ["m1", "m3", "m2", "m4"]))  # file order is not the cable order
    assert choice.name == "jaccl-ring" and choice.order == ("m1", "m2", "m3", "m4")
    assert choice.describe() == ("backend jaccl-ring: RDMA over Thunderbolt between ring neighbours "
                                 "m1 → m2 → m3 → m4 → m1; not a full mesh: no Thunderbolt cable between m1 and m3 "
                                 "(and 1 more)")
    assert json.loads(choice.devices_json()) == [
        [None, "rdma_en2", None, "rdma_en3"],
        ["rdma_en2", None, "rdma_en3", None],
        [None, "rdma_en2", None, "rdma_en3"],
        ["rdma_en3", None, "rdma_en2", None]]
    assert choose_backend("jaccl-ring", macs(room)).devices == choice.devices


def test_explicit_jaccl_on_a_ring_names_the_missing_pairs_and_the_fix() -> None:
    with pytest.raises(HostError) as err:
        choose_backend("jaccl", macs(ring_room()))
    assert err.value.message == ("--backend jaccl needs RDMA between every pair of Macs: no Thunderbolt cable "
                                 "between m1 and m3; no Thunderbolt cable between m2 and m4")
    assert err.value.hint == CABLE_HINT and "jaccl-ring" in CABLE_HINT


def test_a_chain_is_neither_mesh_nor_ring_auto_takes_the_tcp_ring() -> None:
    room = Room.of("m1", "m2", "m3").cable("m1", "m2").cable("m2", "m3")
    choice = choose_backend("auto", macs(room))
    assert (choice.name, choice.describe()) == ("ring", "backend ring: no Thunderbolt cable between m1 and m3")
    assert choice.order == () and choice.devices == ()
    with pytest.raises(HostError, match=r"jaccl-ring needs RDMA between ring neighbours.*m1 and m3"):
        choose_backend("jaccl-ring", macs(room))


# ---- Macs that cannot -> the ring, with the reason ------------------------------------------------

def test_thunderbolt4_mac_without_rdma_devices() -> None:
    room = Room(Mac("mini1"), Mac("mini2", model="Mac mini", speed="Up to 40 Gb/s", rdma=False)).cable("mini1", "mini2")
    choice = choose_backend("auto", macs(room))
    assert choice.describe() == ("backend ring: mini2 has no RDMA devices (its Thunderbolt ports run at up to 40 "
                                 "Gb/s: Thunderbolt 4 has no RDMA)")
    with pytest.raises(HostError) as err:
        choose_backend("jaccl", macs(room))
    assert err.value.message.startswith("--backend jaccl cannot run: mini2 has no RDMA devices")
    assert ENABLE in (err.value.hint or "")


def test_rdma_not_enabled_says_how_to_enable_it() -> None:
    room = Room(Mac("mini1"), Mac("mini2", rdma=False)).cable("mini1", "mini2")
    assert choose_backend("auto", macs(room)).describe() == (
        f"backend ring: mini2 has no RDMA devices (Thunderbolt 4 or RDMA not enabled: {ENABLE})")


def test_stale_active_thunderbolt_bridge_breaks_rdma() -> None:
    room = Room.of("m1", "m2", "m3").mesh()
    choice = choose_backend("auto", macs(room, bridge=["m2", "m3"]))
    assert choice.describe() == ("backend ring: m2's Thunderbolt Bridge bridge0 (en2, en3) is active, which "
                                 "breaks RDMA (also: m3)")
    with pytest.raises(HostError) as err:
        choose_backend("jaccl", macs(room, bridge=["m2"]))
    assert "m2's Thunderbolt Bridge" in err.value.message and "sudo ifconfig bridge0 down" in (err.value.hint or "")


def test_a_port_that_is_down_is_named() -> None:
    room = Room(Mac("m1"), Mac("m2", states={"rdma_en2": "PORT_DOWN (1)"})).cable("m1", "m2")
    assert choose_backend("auto", macs(room)).describe() == (
        "backend ring: rdma_en2 on m2 is PORT_DOWN (its port facing m1)")


def test_linux_old_macos_several_slots_and_one_host_take_the_ring() -> None:
    room = Room.of("m1", "m2").cable("m1", "m2")
    linux = [BackendHost(f"h{i}", "Linux", "Debian GNU/Linux 12 (bookworm)") for i in range(2)]
    assert choose_backend("auto", linux).describe() == (
        "backend ring: h0 runs Linux, and RDMA over Thunderbolt needs macOS 26.2+ (also: h1)")
    assert "runs macOS 15.1; RDMA over Thunderbolt needs 26.2+" in choose_backend(
        "auto", macs(room, version="15.1")).reason
    assert choose_backend("auto", macs(room, slots={"m2": 2})).reason == "m2 runs 2 ranks; jaccl takes one rank per Mac"
    assert choose_backend("auto", macs(room)[:1]).reason == "one host: its ranks talk over loopback"
    with pytest.raises(HostError, match="--backend jaccl-ring cannot run: h0 runs Linux"):
        choose_backend("jaccl-ring", linux)
    assert choose_backend("ring", macs(room)).describe() == "backend ring: asked for (--backend ring)"


def test_unknown_backend_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--backend 'rdma' is not one of auto, ring, jaccl, jaccl-ring"):
        check_backend("rdma")


# ---- the coordinator -------------------------------------------------------------------------------

def host(name: str, address: str, *ifaces: InterfaceFacts) -> BackendHost:
    return BackendHost(name, "Darwin", "26.2", interfaces=ifaces, address=address)


def test_coordinator_is_rank0s_address_on_a_network_every_host_shares() -> None:
    # rank 0 has Ethernet, Wi-Fi and a Thunderbolt cable with its own subnet; the others share only Wi-Fi
    tb = InterfaceFacts("en2", "thunderbolt", ("10.0.0.1/30",))
    rank0 = host("a", "10.0.0.1", InterfaceFacts("en0", "ethernet", ("192.168.2.5/24",)),
                 InterfaceFacts("en1", "wifi", ("192.168.1.10/24",)), tb)
    b = host("b", "10.0.0.2", InterfaceFacts("en1", "wifi", ("192.168.1.11/24",)),
             InterfaceFacts("en2", "thunderbolt", ("10.0.0.2/30",)))
    c = host("c", "192.168.1.12", InterfaceFacts("en1", "wifi", ("192.168.1.12/24",)))
    assert pick_coordinator([rank0, b, c]) == ("192.168.1.10", "a's en1 (wifi), on a network every host shares")
    # where the launcher reached rank 0 is shared by all, it wins; otherwise Ethernet before Wi-Fi
    assert pick_coordinator([rank0, b])[0] == "10.0.0.1"
    both = host("d", "192.168.1.13", InterfaceFacts("en0", "ethernet", ("192.168.2.6/24",)),
                InterfaceFacts("en1", "wifi", ("192.168.1.13/24",)))
    assert pick_coordinator([rank0, both])[0] == "192.168.2.5"


def test_coordinator_skips_link_local_and_falls_back_to_the_launchers_address() -> None:
    rank0 = host("a", "172.16.0.2", InterfaceFacts("bridge0", "thunderbolt", ("169.254.1.1/16",)))
    other = host("b", "172.16.0.3", InterfaceFacts("bridge0", "thunderbolt", ("169.254.1.2/16",)))
    assert pick_coordinator([rank0, other]) == (
        "172.16.0.2", "the address macrun reaches a at (no network all hosts share was found)")


# ---- the env contract ------------------------------------------------------------------------------

def rank_env(**kw: object) -> RankEnv:
    return RankEnv(rank=1, world_size=3, local_rank=0, local_world_size=1, master_addr="192.168.1.10",
                   master_port=5000, run_id="r", secret="s", link="thunderbolt",
                   mlx_hostfile="/w/jobs/run/mlx_hostfile.json", **kw)  # type: ignore[arg-type]


def test_a_jaccl_rank_gets_mlx_jaccl_variables_and_no_mlx_hostfile() -> None:
    env = rank_env(backend="jaccl", jaccl_coordinator="192.168.1.10:5002",
                   ibv_devices="/w/jobs/run/mlx_ibv_devices.json").to_environ()
    assert env["MLX_RANK"] == "1" and env["MACRUN_BACKEND"] == "jaccl"
    assert env["MLX_IBV_DEVICES"] == "/w/jobs/run/mlx_ibv_devices.json"
    assert env["MLX_JACCL_COORDINATOR"] == "192.168.1.10:5002"
    assert "MLX_HOSTFILE" not in env and "MLX_JACCL_RING" not in env  # else init() would pick the ring
    assert env["MACRUN_HOSTFILE"] == "/w/jobs/run/mlx_hostfile.json"
    back = RankEnv.from_environ(env)
    assert (back.backend, back.jaccl_coordinator, back.ibv_devices) == (
        "jaccl", "192.168.1.10:5002", "/w/jobs/run/mlx_ibv_devices.json")
    assert back.to_environ() == env
    assert back.mlx_backend == "jaccl" and back.mlx_hostfile == "/w/jobs/run/mlx_hostfile.json"
    ring = rank_env(backend="jaccl-ring", jaccl_coordinator="x:1", ibv_devices="/d").to_environ()
    assert ring["MLX_JACCL_RING"] == "1" and RankEnv.from_environ(ring).mlx_backend == "jaccl"


def test_the_ring_env_is_unchanged_and_jaccl_without_its_variables_is_refused() -> None:
    env = rank_env().to_environ()
    assert env["MLX_HOSTFILE"] == "/w/jobs/run/mlx_hostfile.json"
    assert not {"MACRUN_BACKEND", "MLX_IBV_DEVICES", "MLX_JACCL_COORDINATOR"} & set(env)
    assert RankEnv.from_environ(env).mlx_backend == "ring"
    jaccl = rank_env(backend="jaccl", jaccl_coordinator="x:1", ibv_devices="/d").to_environ()
    with pytest.raises(EnvContractError, match="MLX_JACCL_COORDINATOR is not set"):
        RankEnv.from_environ({k: v for k, v in jaccl.items() if k != "MLX_JACCL_COORDINATOR"})
    with pytest.raises(EnvContractError, match="MACRUN_BACKEND='nccl'"):
        RankEnv.from_environ({**env, "MACRUN_BACKEND": "nccl"})


# ---- front doors: config key, command line, local runs ---------------------------------------------

def test_config_key_strategy_backend(tmp_path: Path) -> None:
    assert load_config(None).strategy.backend == "auto"
    assert load_config(None, ["strategy.backend=jaccl-ring"]).strategy.backend == "jaccl-ring"
    with pytest.raises(ConfigError, match="strategy.backend"):
        load_config(None, ["strategy.backend=rdma"])


def test_local_ranks_cannot_use_jaccl(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--backend jaccl needs --hosts"):
        launch(LaunchSpec(argv=["python", "-c", "pass"], run_dir=tmp_path, nproc=2, backend="jaccl"))


@pytest.mark.parametrize("command", [["run"], ["benchmark"], ["train", "configs/quickstart.yaml"]])
def test_backend_option_is_checked_on_every_launching_command(command: list[str], monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    monkeypatch.delenv("MACRUN_DEBUG", raising=False)
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    result = CliRunner().invoke(app, [*command, "--backend", "rdma", *(["--", "true"] if command == ["run"] else [])])
    assert result.exit_code == 2, result.stdout + result.stderr
    assert "--backend 'rdma' is not one of auto, ring, jaccl, jaccl-ring" in result.stderr


# ---- the launcher's glue: rank order, ring hostfile, coordinator -------------------------------------

def test_remote_launch_orders_ranks_along_the_rdma_ring_and_picks_the_coordinator() -> None:
    from dataclasses import replace

    from distributed.topology import plan_ring
    from launcher.jobs.remote import _plan_backend, ring_host
    from launcher.room.hosts import HostSpec
    from tests.unit.test_rdma import mac_facts

    room = ring_room()
    names = ["m1", "m3", "m2", "m4"]
    specs = [HostSpec(name=n, hostname=f"{n}.local") for n in names]
    facts = {n: replace(mac_facts(n, room), interfaces=lan(i), free_ports=(5000 + i, 6000 + i, 7000 + i))
             for i, n in enumerate(names)}
    address = {n: f"192.168.1.{10 + i}" for i, n in enumerate(names)}
    ring = plan_ring([ring_host(h, facts[h.name], address[h.name]) for h in specs], "auto")
    spec = LaunchSpec(argv=["true"], run_dir=Path("/nonexistent"), hosts=specs, backend="auto")
    choice, ring, coordinator, where = _plan_backend(spec, specs, facts, address, ring)
    assert choice.name == "jaccl-ring" and ring.order == ("m1", "m2", "m3", "m4") == choice.order
    assert ring.addresses == ("192.168.1.10", "192.168.1.12", "192.168.1.11", "192.168.1.13")
    assert (coordinator, where) == ("192.168.1.10:7000", "m1's en0 (ethernet), on a network every host shares")
    spec = replace(spec, backend="ring")
    assert _plan_backend(spec, specs, facts, address, ring)[2:] == (None, "")
