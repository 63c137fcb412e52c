"""Announce a lab host over mDNS the way a Mac with Remote Login does (`_ssh._tcp` + `_device-info._tcp`).

Run inside the host's network namespace:

    python tests/lab/mdns_announce.py --ip 10.231.0.10 --name h0 --model Mac16,10

Zeroconf is bound to the host's Wi-Fi address only (IPv4), which keeps mDNS on the lab bridge and off this
machine's real interfaces. Prints "ready" once both services are registered, then serves until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys

from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf


def build_services(ip: str, name: str, model: str, ssh_port: int) -> list[ServiceInfo]:
    """The two records macOS publishes for a Mac with Remote Login on."""
    address = [socket.inet_aton(ip)]
    server = f"{name}.local."
    return [
        ServiceInfo("_ssh._tcp.local.", f"{name}._ssh._tcp.local.", addresses=address, port=ssh_port,
                    server=server),
        ServiceInfo("_device-info._tcp.local.", f"{name}._device-info._tcp.local.", addresses=address, port=0,
                    properties={"model": model}, server=server),
    ]


async def serve(ip: str, services: list[ServiceInfo]) -> int:
    """Register `services` on `ip`, report readiness on stdout, serve until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    aiozc = AsyncZeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
    try:
        # Probing both names concurrently halves start-up; each call returns once its name is
        # claimed (answerable), leaving the announcement broadcasts running in the background.
        broadcasts = await asyncio.gather(*(aiozc.async_register_service(info) for info in services))
    except Exception as exc:  # noqa: BLE001 - reported to the lab on the readiness line
        print(f"error: {type(exc).__name__}: {exc}", flush=True)
        await aiozc.async_close()
        return 1
    print("ready", flush=True)
    await stop.wait()
    await asyncio.gather(*broadcasts, return_exceptions=True)
    await aiozc.async_unregister_all_services()
    await aiozc.async_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ip", required=True, help="the host's Wi-Fi address; mDNS is bound to it only")
    parser.add_argument("--name", required=True, help="instance and host name, e.g. h0 (-> h0.local.)")
    parser.add_argument("--model", default="Mac16,10", help="device-info model TXT record")
    parser.add_argument("--ssh-port", type=int, default=22)
    args = parser.parse_args(argv)
    return asyncio.run(serve(args.ip, build_services(args.ip, args.name, args.model, args.ssh_port)))


if __name__ == "__main__":
    sys.exit(main())
