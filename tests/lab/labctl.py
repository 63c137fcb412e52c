"""Bring the emulated lab up by hand, to try macrun as a user would (needs root, ip, tc, sshd).

    sudo .venv/bin/python -m tests.lab.labctl up --hosts 3 --mdns
    sudo .venv/bin/python -m tests.lab.labctl status
    sudo .venv/bin/python -m tests.lab.labctl down

`up` leaves the lab running after it exits, writes `hosts.json` into the state dir and prints how to use
it; what was created is kept in `<state dir>/lab.json`, so `status` and `down` work from a new process.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import time
from pathlib import Path

from tests.lab.labnet import STATE_FILE, Lab, LabUnavailable, default_state_dir, netns_pids


def cmd_up(args: argparse.Namespace) -> int:
    """Bring the lab up and print how to use it."""
    state_dir = args.state_dir or default_state_dir(args.prefix)
    start = time.monotonic()
    lab = Lab.up(args.hosts, wifi_rate=args.wifi_rate, tb_rate=args.tb_rate,
                 thunderbolt=not args.no_thunderbolt, prefix=args.prefix, state_dir=state_dir,
                 host_python=args.host_python, announce_mdns=args.mdns, neutral=args.neutral)
    took = time.monotonic() - start
    print(f"lab up: {len(lab.hosts)} hosts in {took:.1f} s, state in {lab.state_dir}")
    _print_hosts(lab)
    macrun = shutil.which("macrun") or str(Path(sys.executable).with_name("macrun"))
    hosts_json = lab.state_dir / "hosts.json"
    key = lab.ssh_home / ".ssh" / "id_ed25519"
    known = lab.ssh_home / ".ssh" / "known_hosts"
    h0, repo = lab.hosts[0], Path(__file__).resolve().parents[2]
    print(f"""
Use it (HOME={lab.ssh_home} holds the lab's key and known_hosts; your own ~/.ssh is not touched):
  HOME={lab.ssh_home} {macrun} hosts check --hosts {hosts_json}
  ssh -F none -i {key} -o UserKnownHostsFile={known} root@{h0.wifi_ip}
  nsenter -t {h0.sshd_pid} -n -m -u bash   # a root shell on {h0.name}, as its sshd sees it
  hosts' Python (MLX, no macrun): {h0.python}
Take it down:
  cd {repo} && {sys.executable} -m tests.lab.labctl down{_prefix_args(args)}""")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print each host's state; exit 0 when everything is up, 1 when something is not, 3 when no lab."""
    state_dir = args.state_dir or default_state_dir(args.prefix)
    if not (state_dir / STATE_FILE).exists():
        print(f"no lab is up (no {state_dir / STATE_FILE})")
        return 3
    lab = Lab.load(state_dir)
    print(f"lab {lab.prefix}: {len(lab.hosts)} hosts, state in {lab.state_dir}")
    healthy = True
    for h in lab.hosts:
        pids = netns_pids(h.netns)
        sshd_ok = h.sshd_pid in pids and _accepts(h.wifi_ip, h.ssh_port)
        healthy &= sshd_ok
        extra = f", mDNS {'up' if h.announcer_pid in pids else 'DOWN'}" if h.announcer_pid else ""
        print(f"  {h.name:4} {h.wifi_ip:15} sshd {'up' if sshd_ok else 'DOWN'}{extra}, {len(pids)} processes")
    return 0 if healthy else 1


def cmd_down(args: argparse.Namespace) -> int:
    """Take the lab down (also what a crashed run left behind)."""
    state_dir = args.state_dir or default_state_dir(args.prefix)
    if (state_dir / STATE_FILE).exists():
        Lab.load(state_dir).down()
        print(f"lab {args.prefix} is down")
    elif Lab.cleanup_stale(args.prefix, state_dir):
        print(f"removed what an earlier lab {args.prefix} left behind")
    else:
        print(f"no lab {args.prefix} was up")
    return 0


def _print_hosts(lab: Lab) -> None:
    print(f"  master (this machine) {lab.master_ip} on {lab.prefix}-br, Wi-Fi {lab.wifi_rate} shared")
    for h in lab.hosts:
        links = ", ".join(f"{iface} {ip} -> {h.tb_neighbours[iface]}" for iface, ip in sorted(h.tb.items()))
        print(f"  {h.name:4} {h.wifi_ip:15} netns {h.netns}" + (f"; {links}" if links else ""))


def _accepts(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=1):
            return True
    except OSError:
        return False


def _prefix_args(args: argparse.Namespace) -> str:
    extra = f" --prefix {args.prefix}" if args.prefix != "mrl" else ""
    return extra + (f" --state-dir {args.state_dir}" if args.state_dir else "")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m tests.lab.labctl", description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", default="mrl", help="name prefix of namespaces and links (default mrl)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where keys, logs, hosts.json and lab.json live (default /tmp/macrun-lab)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="bring the lab up and leave it running")
    up.add_argument("--hosts", type=int, default=3, help="number of emulated hosts (default 3)")
    up.add_argument("--no-thunderbolt", action="store_true", help="Wi-Fi only, no thunderbolt links")
    up.add_argument("--neutral", action="store_true",
                    help="thunderbolt links up without IPv4, like cabled Macs before `macrun hosts setup-thunderbolt`")
    up.add_argument("--mdns", action="store_true",
                    help="announce hosts over mDNS (like Macs with Remote Login)")
    up.add_argument("--wifi-rate", default="200mbit", help="shared Wi-Fi rate (tc syntax, default 200mbit)")
    up.add_argument("--tb-rate", default="10gbit", help="thunderbolt link rate (default 10gbit)")
    up.add_argument("--host-python", default=None, help="interpreter on the hosts (default: a venv with MLX)")
    sub.add_parser("status", help="show whether the lab's hosts are up")
    sub.add_parser("down", help="take the lab down")
    args = parser.parse_args(argv)
    try:
        return {"up": cmd_up, "status": cmd_status, "down": cmd_down}[args.command](args)
    except LabUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
