"""The launcher API: `launch(spec) -> RunResult`, the one path the CLI, the wizard and tests all take.

Local runs (no hosts file) start `nproc` ranks on this machine; remote runs connect to every host over
SSH, probe it, push the job's files and start one rank per slot. Both get the same env contract, the same
rendezvous store and the same job control.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import distributed
from distributed.env import RankEnv
from distributed.errors import MacrunError, UsageError
from distributed.store import new_secret
from distributed.store_server import StoreServer
from launcher.jobs.job import LocalLauncher, RankSpec, RunResult, run_ranks
from launcher.jobs.watchdog import Watch
from launcher.room.hosts import HostSpec, layout_ranks, local_hosts

if TYPE_CHECKING:
    from launcher.models.modelfiles import ModelSpec
    from launcher.views.display import TransferProgress

PACKAGE_DIR = Path(distributed.__file__).resolve().parent
SOURCE_ROOT = PACKAGE_DIR.parent
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")


@dataclass(frozen=True)
class LaunchSpec:
    """Everything one launch needs, resolved."""

    argv: list[str]  # the command every rank runs; a leading "python" becomes each host's interpreter
    run_dir: Path  # on this machine: logs, the MLX hostfile, the run's record
    name: str = "run"  # job folder name on the hosts (<workdir>/jobs/<name>)
    hosts: Sequence[HostSpec] | None = None  # None: local ranks on this machine
    nproc: int = 1  # local ranks when hosts is None
    files: Mapping[str, Path] = field(default_factory=dict)  # relative path on the host -> local file
    workdir: str = ""  # where remote ranks start: relative to the job folder (a synced project), or absolute
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment for every rank
    accept_new_host_keys: bool = False
    fetch: Sequence[str] = ()  # paths in rank 0's job folder copied back into run_dir after the run
    heartbeat_timeout: float = 60.0  # a rank silent this long is lost (training runs pass fault.heartbeat_timeout)
    grace: float = 5.0
    link: str = "auto"  # hosts' ring: auto (Thunderbolt if every neighbour pair is cabled) | thunderbolt | network
    # collectives: auto | ring | jaccl | jaccl-ring (RDMA over Thunderbolt, launcher/thunderbolt/backend.py)
    backend: str = "auto"
    progress_timeout: float | None = None  # ranks report progress (training): the watchdog's timeout, 0 = auto
    graceful_stop: bool = False  # the first Ctrl-C asks the ranks to checkpoint and stop (training)
    min_battery: float = 20.0  # refuse a host on battery below this percentage (0: never)
    keep_checkpoints: int = 3  # checkpoints copied back while the run goes: keep the newest this many
    rejoin: Callable[[], list[str]] | None = None  # names dropped hosts that answer again (fault.rejoin)
    # mlx-lm fine-tunes on hosts: the model each must hold (launcher/models/modelfiles.py)
    model: ModelSpec | None = None
    transfers: Callable[[], TransferProgress] | None = None  # shows copies before the run (--push-model); else lines


def watch_for(spec: LaunchSpec, store: StoreServer) -> Watch:
    """The watchdog and graceful stop a launch gets: only ranks that report progress (macrun train) have them."""
    if spec.progress_timeout is None:
        return Watch()
    return Watch(progress=store.progress_report, timeout=spec.progress_timeout,
                 request_stop=(lambda: store.request(stop=True)) if spec.graceful_stop else None,
                 rejoin=spec.rejoin)


def _free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports free on this machine now, chosen below the ephemeral range (distributed.probe.free_ports)."""
    from distributed.probe import free_ports

    return free_ports(count, host)


def ring_hostfile(addresses: Sequence[str], ports: Sequence[int]) -> str:
    """MLX's ring hostfile: one entry per rank, each a list of "ip:port" the rank listens on."""
    return json.dumps([[f"{a}:{p}"] for a, p in zip(addresses, ports, strict=True)])


# glibc returns every allocation over 32 MiB to the kernel on free, and MLX's CPU backend keeps no cache of
# its own: each 64 MiB buffer then costs 16,385 page faults (55 ms instead of 13 ms, measured with
# `macrun benchmark`). These thresholds keep such buffers in the heap for reuse.
GLIBC_TUNING = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296"


def linux_rank_env(openblas: str | None) -> dict[str, str]:
    """Environment for MLX ranks on a Linux host: OpenBLAS preloaded (MLX's CPU build ships a reference BLAS,
    ~35x slower matmuls; MACRUN_NO_OPENBLAS=1 turns it off) and glibc's malloc kept from unmapping buffers
    (unless GLIBC_TUNABLES is already set)."""
    env: dict[str, str] = {}
    if openblas and not os.environ.get("MACRUN_NO_OPENBLAS"):
        current = os.environ.get("LD_PRELOAD", "")
        env["LD_PRELOAD"] = f"{openblas}:{current}" if current else openblas
    if not os.environ.get("GLIBC_TUNABLES"):
        env["GLIBC_TUNABLES"] = GLIBC_TUNING
    return env


def blas_env() -> dict[str, str]:
    """linux_rank_env for ranks on this machine (nothing on macOS)."""
    if sys.platform != "linux":
        return {}
    return linux_rank_env(str(OPENBLAS) if OPENBLAS.exists() else None)


def host_argv(argv: Sequence[str], python: str) -> list[str]:
    out = list(argv)
    if out and out[0] in ("python", "python3"):
        out[0] = python
    return out


def launch(spec: LaunchSpec, *, emit: Callable[[str], None] = print,
           on_ready: Callable[[list[RankSpec]], None] | None = None) -> RunResult:
    """Start every rank of `spec`, own them until they end, and return what happened."""
    if spec.hosts:
        from launcher.jobs.remote import launch_remote

        return launch_remote(spec, emit=emit, on_ready=on_ready, fetch=spec.fetch)
    return _launch_local(spec, emit=emit, on_ready=on_ready)


def _launch_local(spec: LaunchSpec, *, emit: Callable[[str], None],
                  on_ready: Callable[[list[RankSpec]], None] | None) -> RunResult:
    if spec.nproc < 1:
        raise MacrunError(f"--nproc must be at least 1, got {spec.nproc}")
    if spec.backend.startswith("jaccl"):
        raise UsageError(f"--backend {spec.backend} needs --hosts: RDMA runs between Macs, one rank on each",
                         hint="give a hosts file of Macs cabled with Thunderbolt 5, or leave --backend at auto")
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    slots = layout_ranks(local_hosts(spec.nproc))
    secret, run_id = new_secret(), f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    ports = _free_ports(spec.nproc + 1)
    hostfile = spec.run_dir / "mlx_hostfile.json"
    hostfile.write_text(ring_hostfile(["127.0.0.1"] * spec.nproc, ports[1:]))
    with StoreServer("127.0.0.1", 0, secret, on_log=emit) as store:
        specs = []
        for slot in slots:
            env = RankEnv(rank=slot.rank, world_size=len(slots), local_rank=slot.local_rank,
                          local_world_size=slot.local_world_size, master_addr="127.0.0.1",
                          master_port=ports[0], run_id=run_id, secret=secret, link="local",
                          mlx_hostfile=str(hostfile) if len(slots) > 1 else None,
                          store_addr="127.0.0.1", store_port=store.port).to_environ()
            env.update(blas_env())
            env.update(spec.env)
            specs.append(RankSpec(rank=slot.rank, host_name=slot.host.name, local_rank=slot.local_rank,
                                  argv=host_argv(spec.argv, sys.executable), env=env, cwd=str(Path.cwd()),
                                  python=sys.executable))
        if on_ready:
            on_ready(specs)
        launcher = LocalLauncher(pythonpath=str(SOURCE_ROOT))
        return run_ranks(specs, launchers={"localhost": launcher}, log_dir=spec.run_dir / "logs", emit=emit,
                         heartbeat_ages=store.heartbeat_ages, heartbeat_timeout=spec.heartbeat_timeout,
                         grace=spec.grace, watch=watch_for(spec, store))
