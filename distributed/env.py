"""The env contract: what every rank finds in its environment, read into one frozen dataclass.

torchrun's names and meanings (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) so `init_method="env://"` scripts work; MLX_RANK and MLX_HOSTFILE so an unmodified
`mx.distributed.init()` works; MACRUN_* for macrun's own worker. MASTER_ADDR/MASTER_PORT point at
macrun's rendezvous store; a PyTorch script gets its own port (MASTER_PORT is free for it to use
only when macrun's worker is not running, see README).

With the jaccl backend (RDMA over Thunderbolt) a rank instead gets what MLX's own launcher sets (MLX
0.32.4): MLX_IBV_DEVICES (the path of the N×N device matrix), MLX_JACCL_COORDINATOR (rank 0's ip:port)
and, for jaccl-ring, MLX_JACCL_RING=1; and *no* MLX_HOSTFILE, because `mx.distributed.init()` tries the
ring first whenever MLX_HOSTFILE is set. The ring hostfile, which macrun's worker still uses to probe the
TCP links, moves to MACRUN_HOSTFILE; MACRUN_BACKEND names the backend, and macrun's own ranks call
`mx.distributed.init(backend=env.mlx_backend)`.

Thunderbolt islands (docs/islands.md, distributed/islands.py): when the launcher found cabled groups of Macs
in a room that otherwise talks over the network, every rank also gets MACRUN_ISLANDS (how many islands),
MACRUN_ISLAND_RANK and MACRUN_ISLAND_SIZE (its place in its island), MACRUN_ISLAND_HOSTFILE (its island's
ring over the cables; unset for an island of one rank) and, on each island's leader, MACRUN_LEADER_RANK and
MACRUN_LEADERS_HOSTFILE (the leaders' ring over the network). MLX_RANK/MLX_HOSTFILE stay the whole world's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from distributed.errors import EnvContractError

LINKS = ("thunderbolt", "network", "local")
# mlx-lm fine-tunes on hosts: the folder on this rank's host that holds the same model as the launcher's
# (launcher/models/modelfiles.py found or put it there); unset, model.path is resolved as on the launcher's machine.
MODEL_DIR_VAR = "MACRUN_MODEL_DIR"
BACKENDS = ("ring", "jaccl", "jaccl-ring")  # MACRUN_BACKEND: what launcher/thunderbolt/backend.py chose


@dataclass(frozen=True, slots=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    run_id: str
    secret: str = field(repr=False)  # never shown in reprs or tracebacks
    link: str = "local"
    mlx_hostfile: str | None = None
    store_addr: str | None = None  # macrun's rendezvous store (MACRUN_STORE_ADDR); defaults to master_addr
    store_port: int | None = None  # macrun's rendezvous store (MACRUN_STORE_PORT); defaults to master_port
    backend: str = "ring"  # MACRUN_BACKEND: "ring" | "jaccl" | "jaccl-ring"
    jaccl_coordinator: str | None = None  # MLX_JACCL_COORDINATOR, "ip:port" of rank 0 (jaccl only)
    ibv_devices: str | None = None  # MLX_IBV_DEVICES: path of the JSON device matrix (jaccl only)
    islands: int = 0  # MACRUN_ISLANDS: islands in the launcher's island plan; 0 = none offered
    island_rank: int = 0  # MACRUN_ISLAND_RANK: this rank's place in its island's ring
    island_size: int = 1  # MACRUN_ISLAND_SIZE
    island_hostfile: str | None = None  # MACRUN_ISLAND_HOSTFILE: the island's ring (islands of 2+ ranks)
    leader_rank: int | None = None  # MACRUN_LEADER_RANK: this island's place in the leaders' ring (leaders only)
    leaders_hostfile: str | None = None  # MACRUN_LEADERS_HOSTFILE (leaders only)

    @property
    def mlx_backend(self) -> str:
        """The name `mx.distributed.init(backend=...)` takes: "jaccl" for both jaccl variants, else "ring"."""
        return "jaccl" if self.backend.startswith("jaccl") else "ring"

    def to_environ(self) -> dict[str, str]:
        env = {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "MLX_RANK": str(self.rank),
            "MACRUN_RUN_ID": self.run_id,
            "MACRUN_SECRET": self.secret,
            "MACRUN_LINK": self.link,
            "MACRUN_STORE_ADDR": self.store_addr or self.master_addr,
            "MACRUN_STORE_PORT": str(self.store_port if self.store_port is not None else self.master_port),
        }
        if self.islands:
            env.update(MACRUN_ISLANDS=str(self.islands), MACRUN_ISLAND_RANK=str(self.island_rank),
                       MACRUN_ISLAND_SIZE=str(self.island_size))
            if self.island_hostfile:
                env["MACRUN_ISLAND_HOSTFILE"] = self.island_hostfile
            if self.leader_rank is not None and self.leaders_hostfile:
                env.update(MACRUN_LEADER_RANK=str(self.leader_rank), MACRUN_LEADERS_HOSTFILE=self.leaders_hostfile)
        if self.backend == "ring":
            if self.mlx_hostfile:
                env["MLX_HOSTFILE"] = self.mlx_hostfile
            return env
        env["MACRUN_BACKEND"] = self.backend
        if self.mlx_hostfile:
            env["MACRUN_HOSTFILE"] = self.mlx_hostfile
        env["MLX_IBV_DEVICES"] = self.ibv_devices or ""
        env["MLX_JACCL_COORDINATOR"] = self.jaccl_coordinator or ""
        if self.backend == "jaccl-ring":
            env["MLX_JACCL_RING"] = "1"
        return env

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> RankEnv:
        """Read the contract, naming the first missing or malformed variable."""
        e = os.environ if environ is None else environ

        def need(name: str) -> str:
            value = e.get(name)
            if value is None or value == "":
                raise EnvContractError(
                    f"environment variable {name} is not set",
                    hint="start this program with `macrun run` or `macrun train`, which set it")
            return value

        def number(name: str, low: int = 0) -> int:
            raw = need(name)
            try:
                value = int(raw)
            except ValueError:
                raise EnvContractError(f"environment variable {name}={raw!r} is not an integer") from None
            if value < low:
                raise EnvContractError(f"environment variable {name}={value} must be >= {low}")
            return value

        rank, world = number("RANK"), number("WORLD_SIZE", 1)
        if rank >= world:
            raise EnvContractError(f"RANK={rank} is not below WORLD_SIZE={world}")
        local_rank, local_world = number("LOCAL_RANK"), number("LOCAL_WORLD_SIZE", 1)
        if local_rank >= local_world:
            raise EnvContractError(f"LOCAL_RANK={local_rank} is not below LOCAL_WORLD_SIZE={local_world}")
        link = e.get("MACRUN_LINK", "local")
        if link not in LINKS:
            raise EnvContractError(f"MACRUN_LINK={link!r} is not one of {', '.join(LINKS)}")
        backend = e.get("MACRUN_BACKEND") or "ring"
        if backend not in BACKENDS:
            raise EnvContractError(f"MACRUN_BACKEND={backend!r} is not one of {', '.join(BACKENDS)}")
        jaccl = backend != "ring"
        master_port = number("MASTER_PORT", 1)
        islands = number("MACRUN_ISLANDS") if e.get("MACRUN_ISLANDS") else 0
        island_rank, island_size = (number("MACRUN_ISLAND_RANK"), number("MACRUN_ISLAND_SIZE", 1)) if islands \
            else (0, 1)
        if island_rank >= island_size:
            raise EnvContractError(f"MACRUN_ISLAND_RANK={island_rank} is not below MACRUN_ISLAND_SIZE={island_size}")
        if islands and island_size > 1 and not e.get("MACRUN_ISLAND_HOSTFILE"):
            need("MACRUN_ISLAND_HOSTFILE")
        leader = islands > 0 and island_rank == 0
        leader_rank = number("MACRUN_LEADER_RANK") if leader else None
        if leader_rank is not None and leader_rank >= islands:
            raise EnvContractError(f"MACRUN_LEADER_RANK={leader_rank} is not below MACRUN_ISLANDS={islands}")
        store_port = int(e["MACRUN_STORE_PORT"]) if e.get("MACRUN_STORE_PORT") else master_port
        return cls(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                   master_addr=need("MASTER_ADDR"), master_port=master_port,
                   run_id=need("MACRUN_RUN_ID"), secret=need("MACRUN_SECRET"), link=link,
                   mlx_hostfile=e.get("MACRUN_HOSTFILE" if jaccl else "MLX_HOSTFILE") or None,
                   store_addr=e.get("MACRUN_STORE_ADDR") or None, store_port=store_port, backend=backend,
                   jaccl_coordinator=need("MLX_JACCL_COORDINATOR") if jaccl else None,
                   ibv_devices=need("MLX_IBV_DEVICES") if jaccl else None, islands=islands,
                   island_rank=island_rank, island_size=island_size,
                   island_hostfile=e.get("MACRUN_ISLAND_HOSTFILE") if island_size > 1 else None,
                   leader_rank=leader_rank, leaders_hostfile=need("MACRUN_LEADERS_HOSTFILE") if leader else None)
