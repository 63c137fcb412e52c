"""A rank's heartbeat: a thread that tells the launcher, through the rendezvous store, that this rank lives.

Each beat carries the rank's progress snapshot (distributed.progress) for the launcher's watchdog and
brings back the launcher's requests (a graceful stop). A rank that cannot reach the launcher for its
`launcher_timeout` ends itself with EXIT_LAUNCHER_LOST, so a partitioned host does not keep training alone.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from distributed.errors import RendezvousError

if TYPE_CHECKING:
    from distributed.progress import Progress
    from distributed.store import StoreClient

EXIT_LAUNCHER_LOST = 75  # a rank that ended itself because the launcher was out of reach (EX_TEMPFAIL)


def start_heartbeat(client: StoreClient, rank: int, interval: float = 2.0, *, progress: Progress | None = None,
                    launcher_timeout: float | None = None,
                    on_lost: Callable[[float], None] | None = None) -> threading.Event:
    """Beat for `rank` every `interval` s on a connection of its own until the returned event is set.

    Each beat carries `progress`'s snapshot (for the launcher's watchdog) and stores the launcher's reply
    in `progress.control`. The first beat is sent before returning (so a failure to connect raises here).
    A failed beat is retried on a new connection every interval; with `launcher_timeout`, once no beat
    has got through for that long, `on_lost(seconds)` runs (default: `end_this_rank`), so a rank on a
    partitioned host does not linger once the launcher has given up on it. Without it the thread stops
    after one line on stderr and the launcher notices the silence.
    """
    request_timeout = max(1.0, min(5.0, 2.5 * interval))  # a partition must not hold a beat for 30 s
    beater = client.clone(timeout=request_timeout)  # a barrier on `client` must not delay the heartbeat
    try:
        beater.heartbeat(rank, progress.snapshot() if progress else None)
    except BaseException:
        beater.close()
        raise
    stop = threading.Event()
    lost = on_lost or end_this_rank

    def beat() -> None:
        nonlocal beater
        last_ok = time.monotonic()
        try:
            while not stop.wait(interval):
                try:
                    if beater is None:
                        beater = client.clone(timeout=request_timeout, connect_timeout=request_timeout)
                    control = beater.heartbeat(rank, progress.snapshot() if progress else None)
                    last_ok = time.monotonic()
                    if progress is not None:
                        progress.control = control
                except RendezvousError as e:
                    if stop.is_set():
                        return
                    if launcher_timeout is None:
                        sys.stderr.write(f"macrun: rank {rank} stopped its heartbeat: {e}\n")
                        return
                    if beater is not None:
                        beater.close()
                        beater = None
                    silent = time.monotonic() - last_ok
                    if silent >= launcher_timeout:
                        lost(silent)
                        return
        finally:
            if beater is not None:
                beater.close()

    threading.Thread(target=beat, name=f"rendezvous-heartbeat-{rank}", daemon=True).start()
    return stop


def end_this_rank(silent: float) -> None:
    """The launcher is out of reach: say so and end this process's whole group (the rank and its helpers)."""
    sys.stderr.write(f"macrun: no contact with the launcher for {silent:.0f} s; this rank ends itself\n")
    sys.stderr.flush()
    try:
        os.killpg(os.getpgrp(), signal.SIGTERM)
    except OSError:
        pass
    os._exit(EXIT_LAUNCHER_LOST)  # only reached if SIGTERM is caught or ignored
