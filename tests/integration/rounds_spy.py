"""For rank scripts of the DiLoCo-family tests: record every round's weights around the exchange.

`record_rounds(strategy)` wraps `strategy.sync`; `save_rounds(path)` writes, per round, each rank's local
weights just before the exchange ("local") and theta just after ("theta"), flat float32, as an .npz.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

_local: list[np.ndarray] = []
_theta: list[np.ndarray] = []


def record_rounds(strategy: Any) -> None:
    exchange = strategy.sync

    def sync(model: Any, optimizer: Any, step: int) -> None:
        _local.append(np.array(strategy._flatten(model)))
        exchange(model, optimizer, step)
        _theta.append(np.array(strategy.params))

    strategy.sync = sync


def save_rounds(path: Path) -> None:
    np.savez(path, local=np.stack(_local), theta=np.stack(_theta))
