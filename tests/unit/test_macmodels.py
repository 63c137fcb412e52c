"""Mac model identifiers shown as the names people know: "Mac16,10" is a "Mac mini (M4, 2024)"."""

from __future__ import annotations

import re

import pytest

from launcher.models.macmodels import MAC_MODELS, describe_mac, mac_model_name


@pytest.mark.parametrize(("identifier", "name"), [
    ("Macmini9,1", "Mac mini (M1, 2020)"),
    ("MacBookAir10,1", "MacBook Air (M1, 2020)"),
    ("iMac21,1", "iMac (24-inch, M1, 2021)"),
    ("iMac21,2", "iMac (24-inch, M1, 2021)"),
    ("MacBookPro18,3", "MacBook Pro (14-inch, M1 Pro, 2021)"),
    ("Mac13,1", "Mac Studio (M1 Max, 2022)"),
    ("Mac13,2", "Mac Studio (M1 Ultra, 2022)"),
    ("Mac14,2", "MacBook Air (M2, 2022)"),
    ("Mac14,14", "Mac Studio (M2 Ultra, 2023)"),
    ("Mac14,8", "Mac Pro (M2 Ultra, 2023)"),
    ("Mac15,14", "Mac Studio (M3 Ultra, 2025)"),
    ("Mac16,9", "Mac Studio (M4 Max, 2025)"),
    ("Mac16,10", "Mac mini (M4, 2024)"),
    ("Mac16,11", "Mac mini (M4 Pro, 2024)"),
    (" Mac16,10 ", "Mac mini (M4, 2024)"),  # as an mDNS TXT record may carry it
])
def test_known_identifiers_get_their_names(identifier: str, name: str) -> None:
    assert mac_model_name(identifier) == name
    assert describe_mac(identifier) == f"{name} · {identifier.strip()}"


@pytest.mark.parametrize("identifier", ["Mac99,1", "MacBookPro16,1", "Raspberry Pi 5", "x86_64", ""])
def test_unknown_identifiers_are_shown_as_reported(identifier: str) -> None:
    """Intel Macs, Macs newer than the table and Linux hosts keep what they reported."""
    assert mac_model_name(identifier) == identifier and describe_mac(identifier) == identifier


def test_no_identifier_stays_none() -> None:
    assert mac_model_name(None) is None and describe_mac(None) is None


def test_table_covers_every_apple_silicon_family_and_is_well_formed() -> None:
    for identifier, name in MAC_MODELS.items():
        assert re.fullmatch(r"(Mac|MacBookAir|MacBookPro|Macmini|iMac)\d+,\d+", identifier), identifier
        assert re.fullmatch(r"(MacBook Air|MacBook Pro|Mac mini|iMac|Mac Studio|Mac Pro) \(.*M[1-4].*, 20\d\d\)",
                            name), name
    names = set(MAC_MODELS.values())
    # Every Apple Silicon product line and generation Apple made (no M3 Mac mini, no M2 iMac).
    made = {"MacBook Air": "1234", "MacBook Pro": "1234", "Mac mini": "124", "iMac": "134"}
    for product, chips in made.items():
        for chip in chips:
            assert any(n.startswith(f"{product} (") and re.search(rf"\bM{chip}\b", n) for n in names), (product, chip)
    for studio in ("M1 Max", "M1 Ultra", "M2 Max", "M2 Ultra", "M3 Ultra", "M4 Max"):
        assert f"Mac Studio ({studio}, " in " ".join(names)
