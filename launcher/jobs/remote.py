"""Launching on hosts: connect, probe, place the ring, pick the backend, push the files, start ranks, fetch results.

Every step that can fail for a user reason (unreachable host, unknown key, missing or mismatched MLX)
happens before any rank starts, and each fails with one HostError naming the host and the fix.
"""

from __future__ import annotations

import posixpath
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from distributed.env import MODEL_DIR_VAR, RankEnv
from distributed.errors import HostError
from distributed.links import Link
from distributed.store import new_secret
from distributed.store_server import StoreServer
from distributed.topology import RingHost, RingPlan, plan_ring
from distributed.topology_islands import IslandPlan, plan_islands
from launcher.jobs.api import PACKAGE_DIR, LaunchSpec, host_argv, linux_rank_env, ring_hostfile, watch_for
from launcher.jobs.fetch import CheckpointFetcher, fetch_tree
from launcher.jobs.job import RankSpec, RankState, RunResult, run_ranks
from launcher.models.modelfiles import check_models
from launcher.models.modelpush import place_models
from launcher.room.fit import Machine, require_finetune_fit
from launcher.room.hosts import HostSpec, layout_ranks
from launcher.room.preflight import HostFacts, Problem, check_hosts, probe_hosts, render_preflight, run_preflight
from launcher.thunderbolt.backend import BackendChoice, BackendHost, choose_backend, pick_coordinator
from launcher.transport.ranks import SSHLauncher
from launcher.transport.ssh import SSHConnection, connect_all
from launcher.transport.sync import FILE_MODE, SyncReport, package_files, sync_all
from launcher.views.display import render_text


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


def _size(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _job_dir(host: HostSpec, name: str) -> str:
    return posixpath.join(host.workdir.rstrip("/") or "/", "jobs", name)


def _prestart_shims(conns: Sequence[SSHConnection], reports: dict[str, SyncReport]) -> dict[str, SSHLauncher]:
    """A launcher per host with a shim per slot already started in the synced job folder
    (launcher/transport/ranks.py)."""
    launchers = {c.host.name: SSHLauncher(c, reports[c.host.name].remote_dir) for c in conns}
    with ThreadPoolExecutor(max_workers=len(conns)) as pool:
        list(pool.map(lambda c: launchers[c.host.name].prestart(c.host.python, c.host.slots), conns))
    return launchers


def _prepare_hosts(
    conns: Sequence[SSHConnection], files: dict[str, Path], job_dirs: dict[str, str], timings: dict[str, float],
    min_battery: float = 20.0, launchers: dict[str, SSHLauncher] | None = None,
) -> tuple[tuple[dict[str, HostFacts], list[Problem]], dict[str, list[int]], dict[str, SyncReport]]:
    """Probe every host (asking it for free ports too) and sync the job's files, at once.

    The probe and the sync are independent remote commands on separate channels of one connection, so
    their round trips and interpreter start-ups overlap instead of adding up (the probe is the longer).
    Its errors come first, so a host without a usable Python is reported by the probe. Syncing before
    the preflight verdict is safe: nothing runs until every check passed. Once synced, each rank's shim
    is started into `launchers` while the probe goes on; it waits for a request that only comes if
    every check passes (and ends, having run nothing, when its channel closes).
    """
    def timed(name: str, fn: Callable[[], Any]) -> Any:
        began = time.perf_counter()
        try:
            return fn()
        finally:
            timings[name] = time.perf_counter() - began

    def sync_then_prestart() -> dict[str, SyncReport]:
        reports = timed("sync", lambda: sync_all(conns, files, job_dirs))
        if launchers is not None:
            launchers.update(timed("prestart", lambda: _prestart_shims(conns, reports)))
        return reports

    with ThreadPoolExecutor(max_workers=1) as pool:
        sync_future = pool.submit(sync_then_prestart)
        workdirs = {c.host.name: c.host.workdir for c in conns}
        ports = {c.host.name: port_count(c.host.slots) for c in conns}  # see port_count
        preflight = timed("probe", lambda: run_preflight(conns, workdir_by_host=workdirs, ports_by_host=ports,
                                                         min_battery=min_battery))
        found = {name: list(f.free_ports) for name, f in preflight[0].items()}
        for name, want in ports.items():
            if len(found.get(name, ())) != want:
                raise HostError(f"{name}: the probe found no free TCP ports", hint="check the host's open files")
        return preflight, found, sync_future.result()


def _push_hostfile(conns: Sequence[SSHConnection], hostfile: Path, job_dir: dict[str, str]) -> None:
    """Put the ring hostfile (known only once every host named its free ports) into each job folder."""
    with ThreadPoolExecutor(max_workers=len(conns)) as pool:
        list(pool.map(lambda c: c.put_file(hostfile, posixpath.join(job_dir[c.host.name], hostfile.name),
                                           mode=FILE_MODE), conns))


def ring_host(host: HostSpec, facts: HostFacts, address: str) -> RingHost:
    """The ring planner's view of a host: its probed interfaces, where one holding an address listed in
    hosts.json's `fast_ips` counts as Thunderbolt whatever the probe called it (e.g. a direct 10 GbE cable)."""
    fast = set(host.fast_ips)
    links = tuple(Link(i.name, "thunderbolt" if fast & set(i.addresses) else i.kind, i.ipv4, i.up, i.members)
                  for i in facts.interfaces)
    return RingHost(host.name, host.slots, address, links)


def _interface_of(facts: HostFacts, address: str) -> str | None:
    """The host's interface holding `address`, as the probe saw it; None when none does (e.g. NAT)."""
    return next((i.name for i in facts.interfaces if address in i.addresses), None)


def _plan_backend(spec: LaunchSpec, hosts: Sequence[HostSpec], facts: dict[str, HostFacts],
                  address: dict[str, str], ring: RingPlan) -> tuple[BackendChoice, RingPlan, str | None, str]:
    """The backend (launcher/thunderbolt/backend.py), the ring plan its rank order needs, jaccl's coordinator and
    why that.

    jaccl-ring orders the ranks along the RDMA cables; when that differs from the ring plan's order, the
    ring hostfile (which macrun's worker still uses to probe TCP links) follows it over the network.
    """
    by_name = {h.name: h for h in hosts}
    view = {n: BackendHost.from_facts(facts[n], by_name[n].slots, address[n]) for n in ring.order}
    choice = choose_backend(spec.backend, [view[n] for n in ring.order])
    if not choice.is_jaccl:
        return choice, ring, None, ""
    if choice.order != ring.order:
        ring = plan_ring([ring_host(by_name[n], facts[n], address[n]) for n in choice.order], "network")
    ip, where = pick_coordinator([view[n] for n in choice.order])
    first = choice.order[0]
    return choice, ring, f"{ip}:{facts[first].free_ports[by_name[first].slots + 1]}", where


def port_count(slots: int) -> int:
    """Free ports asked of a host with `slots` ranks, in this order: MASTER_PORT, one per ring rank, jaccl's
    coordinator, one per island-ring rank, one for the islands' leaders' ring (docs/islands.md)."""
    return 2 * slots + 3


def _plan_islands(spec: LaunchSpec, hosts: Sequence[HostSpec], facts: dict[str, HostFacts],
                  address: dict[str, str], ring: RingPlan, choice: BackendChoice) -> IslandPlan | None:
    """Thunderbolt islands (distributed/topology_islands.py) when the ring had to go over the network but some
    hosts share cables; the ranks decide whether to use them (strategy.mode). None otherwise."""
    if spec.link != "auto" or ring.link != "network" or choice.is_jaccl:
        return None
    by_name = {h.name: h for h in hosts}
    return plan_islands([ring_host(by_name[n], facts[n], address[n]) for n in ring.order])


def _island_files(plan: IslandPlan, ports: dict[str, list[int]], slots: dict[str, int],
                  run_dir: Path) -> list[Path]:
    """Each island's ring hostfile (islands of 2+ ranks) and the leaders' ring hostfile, on the ports set
    aside for them (port_count)."""
    files = []
    for i, island in enumerate(plan.islands):
        if len(island.ring.rank_hosts) < 2:
            continue
        seen: dict[str, int] = {}
        island_ports = []
        for host in island.ring.rank_hosts:
            local = seen[host] = seen.get(host, -1) + 1
            island_ports.append(ports[host][slots[host] + 2 + local])
        files.append(run_dir / f"mlx_island{i}.json")
        files[-1].write_text(ring_hostfile(island.ring.addresses, island_ports))
    files.append(run_dir / "mlx_leaders.json")
    files[-1].write_text(ring_hostfile(plan.leaders.addresses,
                                       [ports[h][2 * slots[h] + 2] for h in plan.leaders.order]))
    return files


def _island_env(plan: IslandPlan, host: str, local_rank: int, job_dir: str) -> dict[str, Any]:
    """The RankEnv fields of a rank in the island plan (distributed/env.py)."""
    i = plan.island_of(host)
    size = len(plan.islands[i].ring.rank_hosts)
    leader = plan.is_leader(host, local_rank)
    return dict(islands=len(plan.islands), island_rank=plan.island_rank(host, local_rank), island_size=size,
                island_hostfile=posixpath.join(job_dir, f"mlx_island{i}.json") if size > 1 else None,
                leader_rank=i if leader else None,
                leaders_hostfile=posixpath.join(job_dir, "mlx_leaders.json") if leader else None)


def _place_model(spec: LaunchSpec, conns: Sequence[SSHConnection], facts: dict[str, HostFacts],
                 found: dict[str, Any], emit: Callable[[str], None]) -> dict[str, str]:
    """An mlx-lm fine-tune: refuse it if it will not fit a host's memory, then find or push the model
    (launcher/models/modelpush.py); {host: the folder its ranks load}. The fit comes first: no copy for nothing."""
    if spec.model is None:
        return {}
    if spec.model.memory is not None:
        require_finetune_fit(spec.model.memory, [Machine(c.host.name, facts[c.host.name].memory_bytes,
                                                         c.host.slots) for c in conns])
    return place_models(conns, spec.model, found, emit=emit, progress=spec.transfers() if spec.transfers else None)


def launch_remote(spec: LaunchSpec, *, emit: Callable[[str], None],
                  on_ready: Callable[[list[RankSpec]], None] | None = None,
                  fetch: Sequence[str] = ()) -> RunResult:
    """Run `spec` on its hosts (see launcher.jobs.api.launch)."""
    hosts = list(spec.hosts or ())
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    conns = connect_all(hosts, accept_new_host_key=spec.accept_new_host_keys)
    timings["connect"] = time.perf_counter() - started
    by_name = {c.host.name: c for c in conns}
    launchers: dict[str, SSHLauncher] = {}  # filled once synced, each with its shims started
    try:
        files = {**package_files(PACKAGE_DIR, "distributed"), **spec.files}
        with ThreadPoolExecutor(max_workers=1) as pool:  # looking for the model may hash it: alongside the probe
            models = pool.submit(check_models, conns, spec.model) if spec.model is not None else None
            (facts, warnings), ports, reports = _prepare_hosts(
                conns, files, {h.name: _job_dir(h, spec.name) for h in hosts}, timings, spec.min_battery, launchers)
            emit(render_text(render_preflight(facts, warnings)))
            for w in warnings:
                emit(f"warning: {w.host}: {w.message}")
            model_dirs = _place_model(spec, conns, facts, models.result() if models else {}, emit)
        job_dir = {name: r.remote_dir for name, r in reports.items()}
        address = {h.name: (h.ips[0] if h.ips else by_name[h.name].peer_addr) for h in hosts}
        ring = plan_ring([ring_host(h, facts[h.name], address[h.name]) for h in hosts], spec.link)
        choice, ring, coordinator, where = _plan_backend(spec, hosts, facts, address, ring)
        emit(ring.describe())
        emit(choice.describe() + (f"; coordinator {coordinator}, {where}" if coordinator else ""))
        # The plan may reorder hosts so that ring neighbours share a cable (rank 0's host stays first).
        slots = layout_ranks(sorted(hosts, key=lambda h: ring.order.index(h.name)))
        ring_ports = {name: list(p[1:]) for name, p in ports.items()}
        hostfile = spec.run_dir / "mlx_hostfile.json"
        hostfile.write_text(ring_hostfile(ring.addresses, [ring_ports[s.host.name][s.local_rank] for s in slots]))
        began = time.perf_counter()
        _push_hostfile(conns, hostfile, job_dir)
        if choice.is_jaccl:  # MLX_IBV_DEVICES names a file, as with mlx.launch
            devices = spec.run_dir / "mlx_ibv_devices.json"
            devices.write_text(choice.devices_json())
            _push_hostfile(conns, devices, job_dir)
        islands = _plan_islands(spec, hosts, facts, address, ring, choice)
        if islands is not None:
            emit(islands.describe())
            for path in _island_files(islands, ports, {h.name: h.slots for h in hosts}, spec.run_dir):
                _push_hostfile(conns, path, job_dir)
        timings["hostfile"] = time.perf_counter() - began
        sent = sum(r.sent for r in reports.values())
        sent_bytes = sum(r.bytes_sent for r in reports.values()) + len(hosts) * hostfile.stat().st_size
        emit(f"synced {len(files) + 1} files to {len(hosts)} host(s): {sent + len(hosts)} sent "
             f"({_size(sent_bytes)}), {sum(r.skipped for r in reports.values())} unchanged")

        secret, run_id = new_secret(), f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        rank0 = slots[0].host.name
        with StoreServer("0.0.0.0", 0, secret, on_log=emit) as store:
            specs = []
            for slot in slots:
                name = slot.host.name
                env = RankEnv(rank=slot.rank, world_size=len(slots), local_rank=slot.local_rank,
                              local_world_size=slot.local_world_size, master_addr=address[rank0],
                              master_port=ports[rank0][0], run_id=run_id, secret=secret, link=ring.link,
                              mlx_hostfile=posixpath.join(job_dir[name], "mlx_hostfile.json"),
                              store_addr=by_name[name].local_addr, store_port=store.port, backend=choice.name,
                              jaccl_coordinator=coordinator,
                              ibv_devices=posixpath.join(job_dir[name], "mlx_ibv_devices.json")
                              if choice.is_jaccl else None,
                              **(_island_env(islands, name, slot.local_rank, job_dir[name]) if islands else {})
                              ).to_environ()
                iface = _interface_of(facts[name], address[name])
                if iface:  # torch's gloo binds where the hostname resolves (often 127.0.1.1 on Linux) otherwise
                    env["GLOO_SOCKET_IFNAME"] = iface
                if facts[name].os_name == "Linux":
                    env.update(linux_rank_env(facts[name].openblas))  # see distributed/probe.py: find_openblas
                env.update(spec.env)
                if name in model_dirs:
                    env[MODEL_DIR_VAR] = model_dirs[name]
                specs.append(RankSpec(rank=slot.rank, host_name=name, local_rank=slot.local_rank,
                                      argv=host_argv(spec.argv, by_name[name].host.python), env=env,
                                      cwd=posixpath.normpath(posixpath.join(job_dir[name], spec.workdir)),
                                      python=by_name[name].host.python))
            if on_ready:
                on_ready(specs)
            t = timings
            emit(f"starting {len(specs)} rank(s) on {len(hosts)} host(s) ({time.perf_counter() - started:.2f} s "
                 f"from connecting: connect {t['connect']:.2f} s, probe {t['probe']:.2f} s with sync "
                 f"{t['sync']:.2f} s alongside, hostfile {t['hostfile']:.2f} s)")
            for h in hosts:
                launchers.setdefault(h.name, SSHLauncher(by_name[h.name], job_dir[h.name]))
            fetcher = (CheckpointFetcher(by_name[rank0], job_dir[rank0], spec.run_dir, spec.keep_checkpoints, emit)
                       if "checkpoints" in fetch else None)

            def emit_line(line: str) -> None:
                if fetcher is not None:
                    fetcher.saw(line)
                emit(line)

            result: RunResult | None = None
            try:
                result = run_ranks(specs, launchers=launchers, log_dir=spec.run_dir / "logs", emit=emit_line,
                                   heartbeat_ages=store.heartbeat_ages, heartbeat_timeout=spec.heartbeat_timeout,
                                   grace=spec.grace, watch=watch_for(spec, store))
            finally:
                # Rank 0's host out of reach (frozen, cut off): what it wrote since the last copy stays there,
                # and waiting on SFTP to a dead host would only hold up the restart.
                rank0_lost = result is not None and any(r.rank == 0 and r.state is RankState.LOST
                                                        for r in result.ranks)
                if fetcher is not None:
                    fetcher.close(timeout=0 if rank0_lost else 30)
        if rank0_lost and fetch:
            emit(f"warning: {rank0} (rank 0) is out of reach: its output since the last checkpoint copied here "
                 f"stays there")
            fetch = ()
        for rel in fetch:
            try:
                copied = fetch_tree(by_name[rank0], posixpath.join(job_dir[rank0], rel), spec.run_dir / rel,
                                    lock=fetcher.lock if fetcher else None)
            except Exception as exc:  # noqa: BLE001 - rank 0's host may be gone: paramiko, socket or our errors
                emit(f"warning: could not copy {rel} back from {rank0}: {exc}")
                continue
            if copied:
                emit(f"fetched {rel} from {rank0} ({copied} file(s)) into {spec.run_dir / rel}")
        return result
    finally:
        for launcher in launchers.values():
            launcher.discard()
        for conn in conns:
            conn.close()
