"""RDMA and Thunderbolt tool output in the formats macOS 26.2 prints (written for the tests from the documented
formats: MLX's docs for `ibv_devices`, rdma-core's `ibv_devinfo`, system_profiler's JSON as MLX's
`mlx.distributed_config` reads it), and a small builder that cables Macs together and prints theirs.

Nothing here was captured on a real Mac.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

# `ibv_devices` on an M3 Ultra with RDMA enabled (the example in MLX's distributed docs).
IBV_DEVICES = """\
    device          \t   node GUID
    ------          \t----------------
    rdma_en2        \t8096a9d9edbaac05
    rdma_en3        \t8196a9d9edbaac05
    rdma_en5        \t8396a9d9edbaac05
    rdma_en4        \t8296a9d9edbaac05
    rdma_en6        \t8496a9d9edbaac05
    rdma_en7        \t8596a9d9edbaac05
"""

# `ibv_devices` on a Mac where RDMA is not enabled: the header only.
IBV_DEVICES_NONE = "    device          \t   node GUID\n    ------          \t----------------\n"


def devinfo_block(name: str, state: str = "PORT_ACTIVE (4)", guid: str = "8096:a9d9:edba:ac05") -> str:
    """One `ibv_devinfo` device block (rdma-core's layout: tabs, one port)."""
    return (f"hca_id:\t{name}\n"
            "\ttransport:\t\t\tInfiniBand (0)\n"
            "\tfw_ver:\t\t\t\t0.0.0\n"
            f"\tnode_guid:\t\t\t{guid}\n"
            f"\tsys_image_guid:\t\t\t{guid}\n"
            "\tvendor_id:\t\t\t0x05ac\n"
            "\tvendor_part_id:\t\t\t0\n"
            "\thw_ver:\t\t\t\t0x0\n"
            "\tphys_port_cnt:\t\t\t1\n"
            "\t\tport:\t1\n"
            f"\t\t\tstate:\t\t\t{state}\n"
            "\t\t\tmax_mtu:\t\t4096 (5)\n"
            "\t\t\tactive_mtu:\t\t1024 (3)\n"
            "\t\t\tsm_lid:\t\t\t0\n"
            "\t\t\tport_lid:\t\t0\n"
            "\t\t\tport_lmc:\t\t0x00\n"
            "\t\t\tlink_layer:\t\tEthernet\n\n")


def uid(host: str, receptacle: int) -> str:
    """A stable domain UUID for a host's Thunderbolt bus, in system_profiler's upper-case form."""
    h = hashlib.md5(f"{host}/{receptacle}".encode()).hexdigest().upper()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


@dataclass
class Mac:
    """One Mac in a Room: its ports, what is plugged in, its RDMA devices' states."""

    name: str
    model: str = "Mac Studio"
    receptacles: int = 4
    first_en: int = 2  # receptacle r's network device is en{first_en + r - 1} (Ethernet may take en0/en1)
    speed: str = "Up to 80 Gb/s"  # Thunderbolt 5; a Thunderbolt 4 Mac says "Up to 40 Gb/s"
    rdma: bool = True  # False: RDMA not enabled (or Thunderbolt 4): ibv_devices lists nothing
    states: dict[str, str] = field(default_factory=dict)  # device -> state word, default PORT_ACTIVE (4)
    peers: dict[int, tuple[str, int]] = field(default_factory=dict)  # receptacle -> (peer host, its receptacle)
    display_on: int | None = None  # a receptacle with a display plugged in (an _items entry without a domain)

    def iface(self, receptacle: int) -> str:
        return f"en{self.first_en + receptacle - 1}"

    def hardware_ports(self) -> str:
        """`networksetup -listallhardwareports`."""
        lines = ["", "Hardware Port: Ethernet", "Device: en0", "Ethernet Address: aa:bb:cc:00:00:01", "",
                 "Hardware Port: Wi-Fi", "Device: en1", "Ethernet Address: aa:bb:cc:00:00:02", "",
                 "Hardware Port: Thunderbolt Bridge", "Device: bridge0", "Ethernet Address: 36:aa:bb:cc:dd:00", ""]
        for r in range(1, self.receptacles + 1):
            lines += [f"Hardware Port: Thunderbolt {r}", f"Device: {self.iface(r)}",
                      f"Ethernet Address: 36:aa:bb:cc:dd:0{r}", ""]
        return "\n".join(lines + ["VLAN Configurations", "===================", ""])

    def devices(self) -> list[str]:
        # listed in ibv_devices' own order, which is not sorted (see IBV_DEVICES)
        names = [f"rdma_{self.iface(r)}" for r in range(1, self.receptacles + 1)]
        return names[1:] + names[:1] if self.rdma else []

    def ibv_devices(self) -> str:
        if not self.rdma:
            return IBV_DEVICES_NONE
        rows = [f"    {d:<16}\t8{i}96a9d9edbaac05" for i, d in enumerate(self.devices())]
        return IBV_DEVICES_NONE + "\n".join(rows) + "\n"

    def ibv_devinfo(self) -> str:
        if not self.rdma:
            return "No IB devices found\n"
        return "".join(devinfo_block(d, self.states.get(d, "PORT_ACTIVE (4)")) for d in self.devices())

    def thunderbolt(self, room: Room) -> str:
        buses = []
        for r in range(1, self.receptacles + 1):
            bus = {"_name": f"thunderboltusb4_bus_{r - 1}", "device_name_key": self.model,
                   "domain_uuid_key": uid(self.name, r), "route_string_key": "0",
                   "switch_uid_key": f"0x05AC8{r}7E0A474D0{r}", "vendor_name_key": "Apple Inc.",
                   "receptacle_1_tag": {"current_speed_key": self.speed, "link_status_key": "0x2",
                                        "receptacle_id_key": str(r),
                                        "receptacle_status_key": "receptacle_no_devices_connected"}}
            if r in self.peers:
                peer, their = self.peers[r]
                bus["receptacle_1_tag"]["receptacle_status_key"] = "receptacle_connected"
                bus["_items"] = [{"_name": room.macs[peer].model, "device_id_key": "0xA",
                                  "device_name_key": "Mac16,9", "domain_uuid_key": uid(peer, their),
                                  "vendor_id_key": "0xA27", "vendor_name_key": "Apple Inc.",
                                  "services_title": [{"_name": "service_ip", "protocol_id_key": 1}]}]
            elif r == self.display_on:
                bus["receptacle_1_tag"]["receptacle_status_key"] = "receptacle_connected"
                bus["_items"] = [{"_name": "Studio Display", "vendor_name_key": "Apple Inc."}]
            buses.append(bus)
        return json.dumps({"SPThunderboltDataType": buses}, indent=2)


class Room:
    """Macs and the Thunderbolt cables between them."""

    def __init__(self, *macs: Mac) -> None:
        self.macs = {m.name: m for m in macs}

    @classmethod
    def of(cls, *names: str, **kw: object) -> Room:
        return cls(*(Mac(n, **kw) for n in names))  # type: ignore[arg-type]

    def cable(self, a: str, b: str) -> Room:
        """Plug a cable into the next free port of each."""
        ma, mb = self.macs[a], self.macs[b]
        ra = next(r for r in range(1, ma.receptacles + 1) if r not in ma.peers)
        rb = next(r for r in range(1, mb.receptacles + 1) if r not in mb.peers)
        ma.peers[ra], mb.peers[rb] = (b, rb), (a, ra)
        return self

    def mesh(self) -> Room:
        names = list(self.macs)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                self.cable(a, b)
        return self

    def port_to(self, a: str, b: str) -> str:
        """The network device of a's port facing b."""
        return self.macs[a].iface(next(r for r, (peer, _) in self.macs[a].peers.items() if peer == b))

    def raw(self, name: str) -> dict[str, object]:
        """The probe's "rdma" object for one Mac (what distributed/probe.py sends back)."""
        mac = self.macs[name]
        from distributed.probe import parse_hardware_ports

        return {"ibv_devices": mac.ibv_devices(), "ibv_devinfo": mac.ibv_devinfo(),
                "thunderbolt": mac.thunderbolt(self), "hardware_ports": parse_hardware_ports(mac.hardware_ports()),
                "notes": []}
