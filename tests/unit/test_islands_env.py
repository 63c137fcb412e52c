"""The islands' part of the env contract (distributed/env.py) and how islands open (distributed/islands.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

import distributed.islands as islands
from distributed.env import RankEnv
from distributed.errors import EnvContractError

BASE = RankEnv(rank=2, world_size=4, local_rank=0, local_world_size=1, master_addr="10.0.0.1", master_port=5000,
               run_id="r", secret="s", link="network", mlx_hostfile="/job/mlx_hostfile.json",
               store_addr="10.0.0.1", store_port=5001)


def test_a_leader_of_a_cabled_island_round_trips() -> None:
    env = replace(BASE, islands=3, island_rank=0, island_size=2, island_hostfile="/job/mlx_island1.json",
                  leader_rank=1, leaders_hostfile="/job/mlx_leaders.json")
    environ = env.to_environ()
    assert environ["MACRUN_ISLANDS"] == "3" and environ["MACRUN_LEADER_RANK"] == "1"
    assert environ["MLX_RANK"] == "2" and environ["MLX_HOSTFILE"] == "/job/mlx_hostfile.json"  # still the world's
    assert RankEnv.from_environ(environ) == env


def test_a_member_and_a_lone_mac_round_trip_without_the_files_they_do_not_use() -> None:
    member = replace(BASE, islands=3, island_rank=1, island_size=2, island_hostfile="/job/mlx_island1.json")
    assert "MACRUN_LEADER_RANK" not in member.to_environ()
    assert RankEnv.from_environ(member.to_environ()) == member
    alone = replace(BASE, islands=3, island_rank=0, island_size=1, leader_rank=2,
                    leaders_hostfile="/job/mlx_leaders.json")
    assert "MACRUN_ISLAND_HOSTFILE" not in alone.to_environ()
    assert RankEnv.from_environ(alone.to_environ()) == alone
    assert RankEnv.from_environ(BASE.to_environ()).islands == 0  # no plan: nothing island-shaped


@pytest.mark.parametrize(("change", "named"), [
    ({"MACRUN_ISLAND_RANK": "2"}, "MACRUN_ISLAND_RANK=2 is not below MACRUN_ISLAND_SIZE=2"),
    ({"MACRUN_LEADER_RANK": "3"}, "MACRUN_LEADER_RANK=3 is not below MACRUN_ISLANDS=3"),
    ({"MACRUN_LEADERS_HOSTFILE": ""}, "MACRUN_LEADERS_HOSTFILE is not set"),
    ({"MACRUN_ISLAND_HOSTFILE": ""}, "MACRUN_ISLAND_HOSTFILE is not set"),
])
def test_a_broken_island_contract_names_the_variable(change: dict[str, str], named: str) -> None:
    env = replace(BASE, islands=3, island_rank=0, island_size=2, island_hostfile="/job/mlx_island1.json",
                  leader_rank=1, leaders_hostfile="/job/mlx_leaders.json")
    with pytest.raises(EnvContractError, match=named):
        RankEnv.from_environ({**env.to_environ(), **change})


def test_an_mlx_without_clear_backends_makes_islands_unavailable_before_any_ring_opens(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(islands, "CLEAR_BACKENDS", "no_such_symbol_in_mlx")
    env = replace(BASE, islands=3, island_rank=1, island_size=2, island_hostfile="/nowhere/island.json")
    with pytest.raises(islands.IslandsUnavailable, match="does not expose clear_backends"):
        islands.open_groups(env)  # a ring opened first would wait for its peers: this returns at once


def test_the_installed_mlx_exposes_clear_backends() -> None:
    assert callable(islands._clear_backends())
