"""HostSpec and RankSlot: a machine of the run, resolved, and one rank's place on it (see launcher.room.hosts)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class HostSpec:
    """One machine, resolved: every default applied, every field checked."""

    name: str  # unique label shown in logs ("[rank 2 studio]"); defaults to the hostname
    hostname: str  # what SSH connects to: an address, a DNS name or a ~/.ssh/config alias
    user: str | None = None  # None: ~/.ssh/config or the local user name
    port: int | None = None  # None: ~/.ssh/config or 22
    key_file: str | None = None  # extra private key to try, besides ssh-agent and ~/.ssh/config
    python: str = "python3"  # interpreter on the host that has MLX
    workdir: str = "~/.macrun"  # per-run folders are created below it
    slots: int = 1  # ranks on this host
    ips: tuple[str, ...] = ()  # addresses other ranks use to reach it (default: the address SSH reached)
    fast_ips: tuple[str, ...] = ()  # fixed addresses on the fast link (Thunderbolt bridge), if any
    labels: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class RankSlot:
    """One rank's place: its global rank, the host it runs on and its index among that host's ranks."""

    rank: int
    host: HostSpec
    local_rank: int
    local_world_size: int
