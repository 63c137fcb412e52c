"""Tool outputs in the format macOS prints (written for the tests, not captured here), shared by parsers."""

# `networksetup -listallhardwareports` on a Mac with Ethernet, a Thunderbolt Bridge and Wi-Fi.
MAC_PORTS = """\

Hardware Port: Ethernet
Device: en5
Ethernet Address: aa:bb:cc:dd:ee:01

Hardware Port: Thunderbolt Bridge
Device: bridge0
Ethernet Address: 36:aa:bb:cc:dd:00

Hardware Port: Wi-Fi
Device: en0
Ethernet Address: 3c:22:fb:00:11:22

Hardware Port: Thunderbolt 1
Device: en1
Ethernet Address: 36:aa:bb:cc:dd:01

Hardware Port: Thunderbolt 2
Device: en2
Ethernet Address: 36:aa:bb:cc:dd:02

VLAN Configurations
===================
"""
