"""Launching on hosts: connect, probe, place the ring, push the job's files, start ranks, fetch results.

Every step that can fail for a user reason (unreachable host, unknown key, missing or mismatched MLX)
happens before any rank starts, and each fails with one HostError naming the host and the fix.
"""

from __future__ import annotations

import json
import os
import posixpath
import secrets
import shlex
import stat
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from io import StringIO
from pathlib import Path
from typing import Any

from rich.console import Console

from distributed.env import RankEnv
from distributed.errors import HostError
from distributed.store import new_secret
from distributed.store_server import StoreServer
from launcher.api import PACKAGE_DIR, LaunchSpec, host_argv, ring_hostfile
from launcher.hosts import HostSpec, layout_ranks
from launcher.job import RankSpec, RunResult, run_ranks
from launcher.preflight import Problem, check_hosts, probe_hosts, render_preflight, run_preflight
from launcher.ranks import SSHLauncher
from launcher.ssh import SSHConnection, connect_all, shell_quote
from launcher.sync import package_files, sync_all

# Asks the host's kernel for free TCP ports (held together so they differ), for the ring and MASTER_PORT.
_FREE_PORTS = (
    "import json,socket,sys\n"
    "s=[socket.socket() for _ in range(int(sys.argv[1]))]\n"
    "[x.bind(('0.0.0.0',0)) for x in s]\n"
    "print(json.dumps([x.getsockname()[1] for x in s]))\n"
)


def _render(renderable: Any) -> str:
    buffer = StringIO()
    Console(file=buffer, width=140, force_terminal=False, color_system=None).print(renderable)
    return buffer.getvalue().rstrip("\n")


def check_hosts_file(hosts: Sequence[HostSpec], *, accept_new_host_keys: bool = False) -> tuple[Any, list[Problem]]:
    """`macrun hosts check`: connect to every host and probe it; returns the table and the problems."""
    conns = connect_all(hosts, accept_new_host_key=accept_new_host_keys)
    try:
        facts = probe_hosts(conns, {h.name: h.workdir for h in hosts})
        problems = check_hosts(facts)
        return render_preflight(facts, problems), problems
    finally:
        for conn in conns:
            conn.close()


def _free_ports(conn: SSHConnection, count: int) -> list[int]:
    result = conn.run(f"{shell_quote(conn.host.python)} -c {shlex.quote(_FREE_PORTS)} {count}", timeout=20)
    try:
        ports = json.loads(result.stdout)
        assert isinstance(ports, list) and len(ports) == count
        return [int(p) for p in ports]
    except (ValueError, AssertionError):
        raise HostError(f"{conn.host.name}: could not find free TCP ports ({result.stderr.strip()[:200]})") from None


def _job_dir(host: HostSpec, name: str) -> str:
    return posixpath.join(host.workdir.rstrip("/") or "/", "jobs", name)


def _fetch_tree(conn: SSHConnection, remote: str, local: Path) -> int:
    """Copy a remote file or folder to `local` over SFTP; returns the number of files copied."""
    sftp = conn.sftp()
    try:
        attrs = sftp.stat(remote)
    except OSError:
        return 0
    if not stat.S_ISDIR(attrs.st_mode or 0):
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".{local.name}.part")
        sftp.get(remote, str(partial))
        partial.replace(local)
        return 1
    copied = 0
    for entry in sftp.listdir_attr(remote):
        if entry.filename.startswith(".tmp-"):
            continue  # a checkpoint still being written
        copied += _fetch_tree(conn, posixpath.join(remote, entry.filename), local / entry.filename)
    return copied


def launch_remote(spec: LaunchSpec, *, emit: Callable[[str], None],
                  on_ready: Callable[[list[RankSpec]], None] | None = None,
                  fetch: Sequence[str] = ()) -> RunResult:
    """Run `spec` on its hosts (see launcher.api.launch)."""
    hosts = list(spec.hosts or ())
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    conns = connect_all(hosts, accept_new_host_key=spec.accept_new_host_keys)
    by_name = {c.host.name: c for c in conns}
    try:
        facts, warnings = run_preflight(conns, workdir_by_host={h.name: h.workdir for h in hosts})
        emit(_render(render_preflight(facts, warnings)))
        for w in warnings:
            emit(f"warning: {w.host}: {w.message}")
        slots = layout_ranks(hosts)
        with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
            ports = dict(zip(by_name, pool.map(lambda c: _free_ports(c, c.host.slots + 1), conns), strict=True))
        address = {h.name: (h.ips[0] if h.ips else by_name[h.name].peer_addr) for h in hosts}
        ring_ports = {name: list(p[1:]) for name, p in ports.items()}
        hostfile = spec.run_dir / "mlx_hostfile.json"
        hostfile.write_text(ring_hostfile([address[s.host.name] for s in slots],
                                          [ring_ports[s.host.name][s.local_rank] for s in slots]))
        files = {**package_files(PACKAGE_DIR, "distributed"), **spec.files, "mlx_hostfile.json": hostfile}
        reports = sync_all(conns, files, {h.name: _job_dir(h, spec.name) for h in hosts})
        sent = sum(r.sent for r in reports.values())
        emit(f"synced {len(files)} files to {len(hosts)} host(s): {sent} sent, "
             f"{sum(r.skipped for r in reports.values())} unchanged")
        job_dir = {name: r.remote_dir for name, r in reports.items()}

        secret, run_id = new_secret(), f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        rank0 = slots[0].host.name
        with StoreServer("0.0.0.0", 0, secret, on_log=emit) as store:
            specs = []
            for slot in slots:
                name = slot.host.name
                env = RankEnv(rank=slot.rank, world_size=len(slots), local_rank=slot.local_rank,
                              local_world_size=slot.local_world_size, master_addr=address[rank0],
                              master_port=ports[rank0][0], run_id=run_id, secret=secret, link="network",
                              mlx_hostfile=posixpath.join(job_dir[name], "mlx_hostfile.json"),
                              store_addr=by_name[name].local_addr, store_port=store.port).to_environ()
                if facts[name].openblas and not os.environ.get("MACRUN_NO_OPENBLAS"):
                    env["LD_PRELOAD"] = facts[name].openblas  # see distributed/probe.py: find_openblas
                env.update(spec.env)
                specs.append(RankSpec(rank=slot.rank, host_name=name, local_rank=slot.local_rank,
                                      argv=host_argv(spec.argv, slot.host.python), env=env, cwd=job_dir[name],
                                      python=slot.host.python))
            if on_ready:
                on_ready(specs)
            emit(f"starting {len(specs)} rank(s) on {len(hosts)} host(s) "
                 f"({time.perf_counter() - started:.2f} s after connecting)")
            launchers = {h.name: SSHLauncher(by_name[h.name], job_dir[h.name]) for h in hosts}
            result = run_ranks(specs, launchers=launchers, log_dir=spec.run_dir / "logs", emit=emit,
                               heartbeat_ages=store.heartbeat_ages, heartbeat_timeout=spec.heartbeat_timeout,
                               grace=spec.grace)
        for rel in fetch:
            copied = _fetch_tree(by_name[rank0], posixpath.join(job_dir[rank0], rel), spec.run_dir / rel)
            if copied:
                emit(f"fetched {rel} from {rank0} ({copied} file(s)) into {spec.run_dir / rel}")
        return result
    finally:
        for conn in conns:
            conn.close()
