"""The names people know for Apple Silicon Mac model identifiers: "Mac16,10" is a "Mac mini (M4, 2024)".

A Mac announces its identifier over mDNS (`_device-info`, TXT `model`) and reports it as `sysctl hw.model`;
nobody recognises their own machine from it. The table covers the Apple Silicon Macs from M1 to M4 and
holds only identifiers that are certain; where one identifier family spans two chips (the 14-inch MacBook
Pro with M3 Pro or M3 Max), the name says both, as Apple's own support pages do. Anything else — an
Intel Mac, a Mac newer than the table, a Linux host's board name — is shown as it was reported.
"""

from __future__ import annotations

MAC_MODELS: dict[str, str] = {
    # M1, 2020-2022
    "MacBookAir10,1": "MacBook Air (M1, 2020)",
    "MacBookPro17,1": "MacBook Pro (13-inch, M1, 2020)",
    "Macmini9,1": "Mac mini (M1, 2020)",
    "iMac21,1": "iMac (24-inch, M1, 2021)",
    "iMac21,2": "iMac (24-inch, M1, 2021)",
    "MacBookPro18,1": "MacBook Pro (16-inch, M1 Pro, 2021)",
    "MacBookPro18,2": "MacBook Pro (16-inch, M1 Max, 2021)",
    "MacBookPro18,3": "MacBook Pro (14-inch, M1 Pro, 2021)",
    "MacBookPro18,4": "MacBook Pro (14-inch, M1 Max, 2021)",
    "Mac13,1": "Mac Studio (M1 Max, 2022)",
    "Mac13,2": "Mac Studio (M1 Ultra, 2022)",
    # M2, 2022-2023
    "Mac14,2": "MacBook Air (M2, 2022)",
    "Mac14,7": "MacBook Pro (13-inch, M2, 2022)",
    "Mac14,15": "MacBook Air (15-inch, M2, 2023)",
    "Mac14,3": "Mac mini (M2, 2023)",
    "Mac14,12": "Mac mini (M2 Pro, 2023)",
    "Mac14,5": "MacBook Pro (14-inch, M2 Pro/Max, 2023)",
    "Mac14,9": "MacBook Pro (14-inch, M2 Pro/Max, 2023)",
    "Mac14,6": "MacBook Pro (16-inch, M2 Pro/Max, 2023)",
    "Mac14,10": "MacBook Pro (16-inch, M2 Pro/Max, 2023)",
    "Mac14,13": "Mac Studio (M2 Max, 2023)",
    "Mac14,14": "Mac Studio (M2 Ultra, 2023)",
    "Mac14,8": "Mac Pro (M2 Ultra, 2023)",
    # M3, 2023-2025
    "Mac15,3": "MacBook Pro (14-inch, M3, 2023)",
    "Mac15,4": "iMac (24-inch, M3, 2023)",
    "Mac15,5": "iMac (24-inch, M3, 2023)",
    "Mac15,6": "MacBook Pro (14-inch, M3 Pro/Max, 2023)",
    "Mac15,8": "MacBook Pro (14-inch, M3 Pro/Max, 2023)",
    "Mac15,10": "MacBook Pro (14-inch, M3 Pro/Max, 2023)",
    "Mac15,7": "MacBook Pro (16-inch, M3 Pro/Max, 2023)",
    "Mac15,9": "MacBook Pro (16-inch, M3 Pro/Max, 2023)",
    "Mac15,11": "MacBook Pro (16-inch, M3 Pro/Max, 2023)",
    "Mac15,12": "MacBook Air (13-inch, M3, 2024)",
    "Mac15,13": "MacBook Air (15-inch, M3, 2024)",
    "Mac15,14": "Mac Studio (M3 Ultra, 2025)",
    # M4, 2024-2025
    "Mac16,1": "MacBook Pro (14-inch, M4, 2024)",
    "Mac16,2": "iMac (24-inch, M4, 2024)",
    "Mac16,3": "iMac (24-inch, M4, 2024)",
    "Mac16,6": "MacBook Pro (14-inch, M4 Pro/Max, 2024)",
    "Mac16,8": "MacBook Pro (14-inch, M4 Pro/Max, 2024)",
    "Mac16,5": "MacBook Pro (16-inch, M4 Pro/Max, 2024)",
    "Mac16,7": "MacBook Pro (16-inch, M4 Pro/Max, 2024)",
    "Mac16,10": "Mac mini (M4, 2024)",
    "Mac16,11": "Mac mini (M4 Pro, 2024)",
    "Mac16,12": "MacBook Air (13-inch, M4, 2025)",
    "Mac16,13": "MacBook Air (15-inch, M4, 2025)",
    "Mac16,9": "Mac Studio (M4 Max, 2025)",
}


def mac_model_name(identifier: str | None) -> str | None:
    """The marketing name of a model identifier ("Mac16,10" -> "Mac mini (M4, 2024)"), else the identifier
    as given (None stays None): an unknown one is still more use to the reader than nothing."""
    if identifier is None:
        return None
    return MAC_MODELS.get(identifier.strip(), identifier)


def describe_mac(identifier: str | None) -> str | None:
    """The name with the identifier after it, for tables: "Mac mini (M4, 2024) · Mac16,10"; an unknown
    identifier alone, as reported."""
    name = mac_model_name(identifier)
    if identifier is None or name == identifier:
        return name
    return f"{name} · {identifier.strip()}"
