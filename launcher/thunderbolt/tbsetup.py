"""`macrun hosts setup-thunderbolt`: give every Thunderbolt cable between the hosts its own /30, over SSH.

    macrun hosts setup-thunderbolt --hosts hosts.json            # the cable map and the plan; changes nothing
    macrun hosts setup-thunderbolt --hosts hosts.json --print    # the commands, to run by hand
    macrun hosts setup-thunderbolt --hosts hosts.json --apply    # run them (sudo asks for a password once)
    macrun hosts setup-thunderbolt --hosts hosts.json --undo     # put back what --apply changed

Why: MLX's ring is fastest over Thunderbolt when each pair of ring neighbours has a point-to-point subnet
(distributed/topology.py), and RDMA (jaccl) fails while the Thunderbolt Bridge holds the ports. So, like
`mlx.distributed_config`, each Mac's ports leave the bridge (which goes down) and each cable gets a /30 with
`ifconfig`; on Linux `ip addr`. Nothing survives a reboot (neither OS keeps addresses set this way): run
--apply again after one. hosts.json gets the cable addresses as `fast_ips` and, under "_thunderbolt", the
record of what was changed, which is what --undo reverses and what makes a second --apply a no-op.

The sudo password is read once (getpass, by the CLI), handed to `sudo -S` on stdin and nowhere else: never
on a command line, in a log or in an error. An SSH user that is root needs no sudo; one with passwordless
sudo is not asked.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from distributed.errors import HostError, HostsError
from launcher.room.hosts import HostSpec, write_atomic
from launcher.room.hosts_parse import _is_mlx_object, _read_json, parse_hosts
from launcher.thunderbolt.tbsetup_parse import GATHER, NEIGHBOUR_PROBE, HostNet, host_net, neighbours
from launcher.thunderbolt.tbsetup_plan import Action, HostRecord, SetupPlan, find_cables, plan_setup, plan_undo
from launcher.transport.sshconn import SSHConnection

RECORD_KEY = "_thunderbolt"
REBOOT_NOTE = ("nothing of this survives a reboot: run `macrun hosts setup-thunderbolt --apply` again after one "
               "(--undo first is not needed)")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the command did, for the CLI's exit code: changes made and hosts where they failed."""

    changed: int
    failed: tuple[str, ...] = ()


# ---- the hosts file's record ------------------------------------------------------------------------------

def read_record(path: Path) -> tuple[dict[str, Any] | None, dict[str, HostRecord]]:
    """hosts.json as a JSON object (None for MLX's hostfile, which has no room for a record) and its record."""
    data = _read_json(path)
    if not isinstance(data, dict) or _is_mlx_object(data):
        return None, {}
    raw = data.get(RECORD_KEY)
    hosts = raw.get("hosts") if isinstance(raw, dict) else None
    return data, {str(k): HostRecord.from_json(v) for k, v in (hosts or {}).items()
                  if HostRecord.from_json(v)}


def updated_hosts_doc(doc: Mapping[str, Any], specs: Sequence[HostSpec], old: Mapping[str, HostRecord],
                      new: Mapping[str, HostRecord], fast: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """`doc` with each host's fast_ips = its own ones (not macrun's old cable addresses) + `fast`, and the
    record replaced by `new` (dropped when empty). `specs` are doc's entries, parsed, in the same order."""
    out = dict(doc)
    entries = [dict(e) for e in doc["hosts"]]
    for entry, spec in zip(entries, specs, strict=True):
        mine = {a.split("/")[0] for _, a in old.get(spec.name, HostRecord()).addresses}
        ips = [ip for ip in spec.fast_ips if ip not in mine]
        ips += [ip for ip in fast.get(spec.name, ()) if ip not in ips]
        if ips:
            entry["fast_ips"] = ips
        else:
            entry.pop("fast_ips", None)
    out["hosts"] = entries
    if new:
        out[RECORD_KEY] = {"_doc": "what `macrun hosts setup-thunderbolt --apply` changed on each host, "
                                   "which --undo reverses; gone after a reboot",
                           "hosts": {h: r.to_json() for h, r in new.items()}}
    else:
        out.pop(RECORD_KEY, None)
    return out


def save_doc(path: Path, before: Mapping[str, Any], after: dict[str, Any]) -> bool:
    """Write `after` over hosts.json, validated, when it differs from `before`; True when written."""
    if json.dumps(before, sort_keys=True) == json.dumps(after, sort_keys=True):
        return False
    parse_hosts(after, str(path), base_dir=path.parent, check_files=False)
    write_atomic(path, json.dumps(after, indent=2) + "\n")
    return True


# ---- talking to the hosts ---------------------------------------------------------------------------------

def _each(conns: Sequence[SSHConnection], fn: Callable[[SSHConnection], Any]) -> list[Any]:
    with ThreadPoolExecutor(max_workers=max(1, len(conns))) as pool:
        return list(pool.map(fn, conns))


def gather(conns: Sequence[SSHConnection]) -> dict[str, HostNet]:
    """Every host's interfaces (and, on a Mac, its Thunderbolt cable map), in parallel."""
    def one(conn: SSHConnection) -> HostNet:
        done = conn.run(GATHER, timeout=30.0)
        if "@@macrun:os" not in done.stdout:
            raise HostError(f"{conn.host.name}: could not list its network interfaces: "
                            f"{done.stderr.strip()[-200:] or 'no output'}", hint="check the host's shell")
        return host_net(done.stdout)

    return dict(zip([c.host.name for c in conns], _each(conns, one), strict=True))


def with_neighbours(conns: Sequence[SSHConnection], nets: dict[str, HostNet]) -> dict[str, HostNet]:
    """Probe the IPv6 neighbours of every Thunderbolt interface, all hosts at once, and read their tables."""
    def one(conn: SSHConnection) -> HostNet:
        net = nets[conn.host.name]
        names = [i.name for i in net.thunderbolt if i.up]
        if not names:
            return net
        table = "/usr/sbin/ndp -an" if net.os == "Darwin" else "ip -j -6 neigh show"
        cmd = (f"{shlex.quote(conn.host.python)} - {shlex.join(names)} >/dev/null 2>&1 || echo probe failed >&2; "
               f"{table}")
        done = conn.run(cmd, timeout=30.0, stdin=NEIGHBOUR_PROBE.encode())
        notes = net.notes + ((f"the IPv6 neighbour probe failed with {conn.host.python} (is it the right "
                              "python in hosts.json?)",) if "probe failed" in done.stderr else ())
        return HostNet(net.os, net.ifaces, net.ports, net.root, net.sudo_without_password,
                       neighbours(done.stdout), notes)

    return dict(zip([c.host.name for c in conns], _each(conns, one), strict=True))


def _needs_neighbours(nets: Mapping[str, HostNet], order: Sequence[str]) -> bool:
    """Whether some Thunderbolt port that is up has no cable by Thunderbolt UIDs, so MACs must say: on a host
    without system_profiler's map (Linux, or a Mac where it failed) any such port; on a Mac with the map only
    a port where it sees a Mac plugged in (an empty port needs no probe)."""
    cables, _ = find_cables(order, nets)
    cabled = {(e.host, e.iface) for c in cables for e in (c.a, c.b)}
    for name in order:
        net = nets[name]
        occupied = {p.iface for p in net.ports if p.peer_uid}
        if any(i.up and (name, i.name) not in cabled and (not net.ports or i.name in occupied)
               for i in net.thunderbolt):
            return True
    return False


def sudo_wrap(commands: Sequence[str], net: HostNet, *, password: bool) -> str:
    """One shell command running `commands` in order, stopping at the first failure, as root."""
    script = shlex.quote("set -e; " + "; ".join(commands))
    if net.root:
        return f"sh -c {script}"
    return f"sudo -S -p '' sh -c {script}" if password else f"sudo -n sh -c {script}"


def run_actions(conns: Sequence[SSHConnection], nets: Mapping[str, HostNet],
                actions: Mapping[str, Sequence[Action]], password: str | None) -> dict[str, str]:
    """Run each host's actions (in parallel); {host: why it failed} for those that did not finish."""
    def one(conn: SSHConnection) -> tuple[str, str]:
        name, net = conn.host.name, nets[conn.host.name]
        todo = actions.get(name, ())
        if not todo:
            return name, ""
        use_password = password is not None and not net.root and not net.sudo_without_password
        cmd = sudo_wrap([a.command(net.os) for a in todo], net, password=use_password)
        done = conn.run(cmd, timeout=60.0, stdin=(password + "\n").encode() if use_password and password else None)
        if done.rc == 0:
            return name, ""
        why = done.stderr.strip().splitlines()[-1:] or [f"exit {done.rc}"]
        if "password" in why[0].lower() or "sorry" in why[0].lower():
            return name, "sudo did not accept the password"
        return name, why[0][:200]

    return {n: why for n, why in _each(conns, one) if why}


# ---- what the user sees -----------------------------------------------------------------------------------

def describe_plan(plan: SetupPlan, nets: Mapping[str, HostNet]) -> list[str]:
    """The cable map: each cable's two ends, its addresses and whether they are there yet."""
    if not plan.cables:
        return ["no Thunderbolt cables found between the hosts"]
    ports = {(h, p.iface): f"Thunderbolt {p.receptacle}" for h, n in nets.items() for p in n.ports if p.iface}
    hows = sorted({c.cable.found_by for c in plan.cables})
    lines = [f"Thunderbolt cables ({len(plan.cables)}, found by {' and '.join(hows)}):"]
    for c in plan.cables:
        ends = []
        for end, ip in ((c.cable.a, c.a_ip), (c.cable.b, c.b_ip)):
            port = ports.get((end.host, end.iface))
            ends.append(f"{end.host} {end.iface}{f' ({port})' if port else ''} {ip}")
        lines.append(f"  {ends[0]}  <->  {ends[1]}   [{c.state}]")
    return lines + [f"note: {n}" for n in plan.notes]


def describe_commands(actions: Mapping[str, Sequence[Action]], nets: Mapping[str, HostNet]) -> list[str]:
    """Each host's commands, as a person would type them there (with sudo unless the SSH user is root)."""
    lines = []
    for host, todo in actions.items():
        if todo:
            sudo = "" if nets[host].root else "sudo "
            lines += [f"{host}:"] + [f"  {sudo}{a.command(nets[host].os)}" for a in todo]
    return lines


def needs_password(nets: Mapping[str, HostNet], actions: Mapping[str, Sequence[Action]]) -> list[str]:
    """The hosts with something to do whose sudo would ask for a password."""
    return [h for h, todo in actions.items() if todo and not nets[h].root and not nets[h].sudo_without_password]


# ---- the command --------------------------------------------------------------------------------------------

def setup_thunderbolt(path: Path, specs: Sequence[HostSpec], conns: Sequence[SSHConnection], *, mode: str,
                      print_only: bool, emit: Callable[[str], None],
                      ask_password: Callable[[list[str]], str]) -> Outcome:
    """Show (mode "show"), apply ("apply") or undo ("undo") the set-up on `conns` (one per host of `specs`).

    `ask_password(hosts)` is called at most once, only when some host's sudo needs a password.
    """
    doc, previous = read_record(path)
    if doc is None and mode != "show" and not print_only:
        raise HostsError(f"{path} is an MLX hostfile: setup-thunderbolt records what it changes in macrun's "
                         "hosts.json format", hint="write a macrun hosts.json (see hosts.example.json), or use "
                                                   "--print and run the commands by hand")
    order = [s.name for s in specs]
    nets = gather(conns)
    if mode == "undo":
        return _undo(path, specs, conns, nets, doc, previous, print_only=print_only, emit=emit,
                     ask_password=ask_password)
    if _needs_neighbours(nets, order):
        nets = with_neighbours(conns, nets)
    cables, loose = find_cables(order, nets)
    plan = plan_setup(order, nets, cables, previous, loose)
    for line in describe_plan(plan, nets):
        emit(line)
    for name in order:
        for note in nets[name].notes:
            emit(f"note: {name}: {note}")
    if print_only or mode == "show":
        commands = describe_commands(plan.actions, nets)
        if print_only:
            emit("run these on each host:" if commands else "nothing to run: every cable has its address")
            for line in commands:
                emit(line)
        elif plan.changes:
            emit(f"{plan.changes} changes on {sum(1 for a in plan.actions.values() if a)} hosts: --apply to make "
                 "them, --print to see the commands")
        else:
            emit("nothing to change: every cable has its address")
        emit(f"note: {REBOOT_NOTE}")
        return Outcome(0)
    failed: dict[str, str] = {}
    in_place = plan
    if plan.changes:
        waiting = needs_password(nets, plan.actions)
        failed = run_actions(conns, nets, plan.actions, ask_password(waiting) if waiting else None)
        now = gather(conns)  # what the hosts have now, not what the commands were meant to do
        done = [c for c in plan.cables if _has(now, c.cable.a.host, c.cable.a.iface, c.a_ip)
                and _has(now, c.cable.b.host, c.cable.b.iface, c.b_ip)]
        emit(f"done: {len(done)} of {len(plan.cables)} cables have their addresses")
        in_place = replace(plan, cables=tuple(done))  # fast_ips name only addresses the hosts really have
    else:
        emit("nothing to change: every cable already has its address")
    # A host that failed half-way may have done part of its actions: record both what it had and what it
    # was to get. That is safe because --undo only reverses what it finds (an absent address is skipped).
    record = dict(plan.record)
    for host in failed:
        record[host] = _union(previous.get(host, HostRecord()), plan.record.get(host, HostRecord()))
    assert doc is not None
    after = updated_hosts_doc(doc, specs, previous, record, in_place.fast_ips())
    if save_doc(path, doc, after):
        emit(f"{path}: fast_ips set to the cable addresses (the ring uses them); what changed is recorded "
             f"under \"{RECORD_KEY}\" for --undo")
    emit(f"note: {REBOOT_NOTE}")
    _raise_failures(failed)
    return Outcome(plan.changes)


def _undo(path: Path, specs: Sequence[HostSpec], conns: Sequence[SSHConnection], nets: Mapping[str, HostNet],
          doc: dict[str, Any] | None, previous: Mapping[str, HostRecord], *, print_only: bool,
          emit: Callable[[str], None], ask_password: Callable[[list[str]], str]) -> Outcome:
    order = [s.name for s in specs]
    actions = plan_undo(order, nets, previous)
    if not previous:
        emit(f"nothing to undo: {path} records no Thunderbolt set-up by macrun")
        return Outcome(0)
    if print_only:
        commands = describe_commands(actions, nets)
        emit("run these on each host:" if commands else "nothing to run: the hosts are as they were")
        for line in commands:
            emit(line)
        return Outcome(0)
    changes = sum(len(a) for a in actions.values())
    failed: dict[str, str] = {}
    if changes:
        waiting = needs_password(nets, actions)
        failed = run_actions(conns, nets, actions, ask_password(waiting) if waiting else None)
        emit(f"undone: {changes - sum(len(actions[h]) for h in failed)} changes on "
             f"{sum(1 for h, a in actions.items() if a and h not in failed)} hosts")
    else:
        emit("nothing to undo on the hosts: they are as they were (after a reboot, say)")
    if doc is not None:
        kept = {h: r for h, r in previous.items() if h in failed}
        if save_doc(path, doc, updated_hosts_doc(doc, specs, previous, kept, {})):
            emit(f"{path}: macrun's cable addresses and record removed")
    _raise_failures(failed)
    return Outcome(changes)


def _has(nets: Mapping[str, HostNet], host: str, iface: str, address: str) -> bool:
    found = nets[host].iface(iface)
    return found is not None and address in found.ipv4


def _union(a: HostRecord, b: HostRecord) -> HostRecord:
    return HostRecord(tuple(dict.fromkeys(a.addresses + b.addresses)), tuple(dict.fromkeys(a.left + b.left)),
                      tuple(dict.fromkeys(a.downed + b.downed)))


def _raise_failures(failed: Mapping[str, str]) -> None:
    if failed:
        detail = "; ".join(f"{h}: {why}" for h, why in sorted(failed.items()))
        raise HostError(f"setup-thunderbolt failed on {len(failed)} host(s): {detail}",
                        hint="fix that and run the same command again: what succeeded is kept and skipped")


__all__ = ["RECORD_KEY", "REBOOT_NOTE", "Outcome", "describe_commands", "describe_plan", "gather", "needs_password",
           "read_record", "run_actions", "save_doc", "setup_thunderbolt", "sudo_wrap", "updated_hosts_doc",
           "with_neighbours"]
