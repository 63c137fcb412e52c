"""The rendezvous store's data and the requests that run on it: decoding a header, checking its fields, the ops.

Pure logic, no sockets: distributed.store_server reads frames and hands each header to `decode_header`,
then to `dispatch`. A bad request costs its sender an error reply ({"ok": false, "error": code,
"message": text}), never the connection's thread. Limits on what a request may ask:

- a header nested deeper than MAX_DEPTH (64) levels is refused before it is parsed (a 64 KiB header of
  brackets would otherwise end the parser in RecursionError);
- a blocking op's timeout must be a number >= 0 and not NaN (NaN would make the wait spin a core
  forever); one over MAX_WAIT_S (24 h), Infinity included, is clamped to it, because the clock calls
  under a wait overflow on larger values and no rendezvous needs to wait longer.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distributed.store import MAX_WAIT_S

MAX_DEPTH = 64
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)  # a JSON string (skipped) or a bracket


class OpError(Exception):
    """A request the store refuses; `code` goes to the client ("bad_request", "timeout", "closing", ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message

    def reply(self) -> dict[str, Any]:
        return {"ok": False, "error": self.code, "message": self.message}


def too_deep(raw: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON text `raw` nests arrays and objects more than `limit` levels deep (brackets inside
    strings do not count). Scans only a header with more than `limit` brackets, and stops at the first
    level past the limit."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    depth = 0
    for token in _TOKENS.finditer(raw):
        kind = token.group()
        if kind in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        elif kind in (b"]", b"}"):
            depth -= 1
    return False


def decode_header(raw: bytes) -> dict[str, Any]:
    """A request header: a JSON object. ValueError when `raw` is not one (the peer does not speak the
    protocol: the server drops it); OpError("bad_header") when it nests deeper than MAX_DEPTH."""
    if too_deep(raw):
        raise OpError("bad_header", f"request header is nested deeper than {MAX_DEPTH} levels")
    try:
        header = json.loads(raw)
    except RecursionError:  # only if the interpreter's own limit is set below MAX_DEPTH
        raise OpError("bad_header", f"request header is nested deeper than {MAX_DEPTH} levels") from None
    if not isinstance(header, dict):
        raise ValueError("not an object")
    return header


@dataclass
class _Barrier:
    world_size: int
    arrived: int = 0
    generation: int = 0


class Table:
    """The data and its one condition variable; every blocking op waits on it."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.data: dict[str, bytes] = {}
        self.barriers: dict[str, _Barrier] = {}
        self.beats: dict[int, float] = {}
        self.progress: dict[int, dict[str, Any]] = {}  # rank -> its last report, "since": when its step changed
        self.control: dict[str, Any] = {}  # what the launcher asks of every rank (e.g. {"stop": true})
        self.closed = False

    def _wait(self, ready: Callable[[], bool], timeout: float) -> bool:
        ok = self.cond.wait_for(lambda: self.closed or ready(), timeout)
        if self.closed:
            raise OpError("closing", "the rendezvous store is shutting down")
        return ok

    def set(self, key: str, value: bytes) -> None:
        with self.cond:
            self.data[key] = bytes(value)
            self.cond.notify_all()

    def get(self, key: str, timeout: float) -> bytes:
        with self.cond:
            if not self._wait(lambda: key in self.data, timeout):
                raise OpError("timeout", f"key {key!r} did not appear within {timeout:g} s")
            return self.data[key]

    def check(self, keys: list[str]) -> bool:
        with self.cond:
            return all(k in self.data for k in keys)

    def wait(self, keys: list[str], timeout: float) -> None:
        with self.cond:
            if not self._wait(lambda: all(k in self.data for k in keys), timeout):
                missing = [k for k in keys if k not in self.data]
                raise OpError("timeout", f"keys {missing} did not appear within {timeout:g} s")

    def add(self, key: str, amount: int) -> int:
        with self.cond:
            try:
                value = int(self.data.get(key, b"0")) + amount
            except ValueError:
                raise OpError("bad_request", f"key {key!r} holds a value that is not a counter") from None
            self.data[key] = str(value).encode()
            self.cond.notify_all()
            return value

    def delete(self, key: str) -> bool:
        with self.cond:
            return self.data.pop(key, None) is not None

    def barrier(self, name: str, world_size: int, timeout: float) -> None:
        with self.cond:
            state = self.barriers.setdefault(name, _Barrier(world_size))
            if state.world_size != world_size:
                if state.arrived:
                    raise OpError("bad_request", f"barrier {name!r} called with world size {world_size} "
                                                 f"while others wait with {state.world_size}")
                state.world_size = world_size
            generation = state.generation
            state.arrived += 1
            if state.arrived == world_size:
                state.arrived, state.generation = 0, generation + 1
                self.cond.notify_all()
                return
            if not self._wait(lambda: state.generation != generation, timeout):
                arrived = state.arrived
                state.arrived -= 1  # we leave, so a retry counts us once
                raise OpError("timeout", f"barrier {name!r} timed out after {timeout:g} s with "
                                         f"{arrived} of {world_size} ranks arrived")

    def heartbeat(self, rank: int, progress: dict[str, Any] | None = None) -> dict[str, Any]:
        """Stamp `rank` alive, keep its progress report; returns the launcher's control requests."""
        with self.cond:
            now = self.beats[rank] = time.monotonic()
            if progress is not None:
                before = self.progress.get(rank)
                moved = before is None or before.get("step") != progress.get("step")
                self.progress[rank] = {**progress, "since": now if moved else before["since"]}  # type: ignore[index]
            return dict(self.control)

    def progress_report(self) -> dict[int, dict[str, Any]]:
        """Each rank's last progress report, with "stalled": seconds since its step last changed."""
        now = time.monotonic()
        with self.cond:
            return {rank: {**p, "stalled": now - p["since"]} for rank, p in self.progress.items()}

    def heartbeat_ages(self) -> dict[int, float]:
        now = time.monotonic()
        with self.cond:
            return {rank: now - t for rank, t in self.beats.items()}

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def valid_progress(p: Any) -> bool:
    """A rank's progress report, as distributed.progress.Progress.snapshot makes it (the watchdog reads it)."""
    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    def seconds(v: Any) -> bool:  # an int too large for a float is not a duration (math.isfinite would raise)
        return v is None or (_number(v) and (isinstance(v, int) or math.isfinite(v)) and 0 <= v <= 1e12)

    return (isinstance(p, dict) and integer(p.get("step")) and integer(p.get("collectives", 0))
            and isinstance(p.get("doing", ""), str) and isinstance(p.get("leave", ""), str)
            and seconds(p.get("step_s")) and seconds(p.get("max_step_s")))


def _field(header: dict[str, Any], name: str, kind: type | tuple[type, ...], low: float | None = None) -> Any:
    value = header.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) or (low is not None and value < low):
        raise OpError("bad_request", f"request field {name!r} is missing or invalid")
    return value


def _keys(header: dict[str, Any]) -> list[str]:
    keys = _field(header, "keys", list)
    if not all(isinstance(k, str) for k in keys):
        raise OpError("bad_request", "request field 'keys' must be a list of strings")
    return keys


def _timeout(header: dict[str, Any]) -> float:
    """The request's wait in seconds: NaN, negative or non-numbers are refused, over MAX_WAIT_S is clamped."""
    value = header.get("timeout")
    if not _number(value) or value != value or value < 0:  # value != value: NaN
        raise OpError("bad_request", f"request field 'timeout' must be a number of seconds >= 0, not NaN "
                                     f"(over {MAX_WAIT_S:g} is clamped to it)")
    return MAX_WAIT_S if value > MAX_WAIT_S else float(value)


def dispatch(t: Table, h: dict[str, Any], body: bytes | None) -> tuple[dict[str, Any], bytes | None]:
    """Run one request on the table: its reply header and value (or None). Refusals are replies too."""
    op = h.get("op")
    try:
        timeout = _timeout(h) if op in ("get", "wait", "barrier") else 0.0
        if op == "set":
            if body is None:
                raise OpError("bad_request", "set needs a value frame")
            t.set(_field(h, "key", str), body)
            return {"ok": True}, None
        if op == "get":
            return {"ok": True, "body": True}, t.get(_field(h, "key", str), timeout)
        if op == "check":
            return {"ok": True, "value": t.check(_keys(h))}, None
        if op == "add":
            return {"ok": True, "value": t.add(_field(h, "key", str), _field(h, "amount", int))}, None
        if op == "wait":
            t.wait(_keys(h), timeout)
            return {"ok": True}, None
        if op == "delete":
            return {"ok": True, "value": t.delete(_field(h, "key", str))}, None
        if op == "barrier":
            t.barrier(_field(h, "name", str), _field(h, "world_size", int, 1), timeout)
            return {"ok": True}, None
        if op == "heartbeat":
            progress = h.get("progress")
            if progress is not None and not valid_progress(progress):
                raise OpError("bad_request", "heartbeat progress must be an object with integer step and "
                                             "collectives, text doing, and step_s/max_step_s numbers or null")
            control = t.heartbeat(_field(h, "rank", int, 0), progress)
            return {"ok": True, "control": control}, None
        raise OpError("bad_request", f"unknown op {op!r}" if isinstance(op, str) and len(op) <= 40 else "unknown op")
    except OpError as e:
        return e.reply(), None
