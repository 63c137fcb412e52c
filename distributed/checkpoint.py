"""Checkpoints a crash cannot corrupt: safetensors files plus a checksummed meta.json, renamed into place.

Layout: `<ckpt_root>/step_00000100/` holds one `<group>.safetensors` per array group (`model`,
`optimizer`, ...; keys are `mlx.utils.tree_flatten` names, so `mx.load` reads them in any MLX tool) and
`meta.json` with the step, the creation time, the caller's meta and every file's size and sha256.
A checkpoint is written into a `.tmp-*` folder, fsynced and renamed, so a `step_*` folder is either
complete or absent; loading verifies every checksum and `latest_checkpoint` falls back past damaged ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from distributed.errors import CheckpointError

FORMAT_VERSION = 1
META_FILE = "meta.json"
SUFFIX = ".safetensors"
TMP_PREFIX = ".tmp-"
STALE_TMP_SECONDS = 3600  # a temp dir of another host is assumed abandoned after this long
_STEP_DIR = re.compile(r"step_(\d{8,})")
_GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_HINT = "resume from an earlier checkpoint, or start afresh without this one"


@dataclass
class Checkpoint:
    """A loaded, verified checkpoint."""

    path: Path
    step: int
    groups: dict[str, dict[str, mx.array]]
    meta: dict

    def tree(self, group: str) -> Any:
        """The group as a nested tree, ready for `model.update(...)` or `optimizer.state = ...`."""
        return unflatten_tree(self.groups[group])


class _Invalid(Exception):
    """Why a checkpoint folder cannot be used (a short reason, without the folder's name)."""


def step_dir_name(step: int) -> str:
    """The folder name of a step's checkpoint, e.g. step_00000100."""
    return f"step_{step:08d}"


def flatten_tree(tree: Any) -> dict[str, mx.array]:
    """A nested tree of arrays (model.parameters(), optimizer.state) as {dotted.name: array}."""
    return dict(tree_flatten(tree))


def unflatten_tree(flat: dict[str, mx.array]) -> Any:
    """The inverse of `flatten_tree`; integer path parts become lists again (model.blocks.0...)."""
    return tree_unflatten(list(flat.items())) if flat else {}


# ---------------------------------------------------------------------------------------------
# Saving


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (not supported everywhere; best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256_file(path: Path, sync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _tmp_dir(ckpt_root: Path, label: str) -> Path:
    # Host and pid in the name let a later run tell an abandoned temp dir from one being written.
    return ckpt_root / f"{TMP_PREFIX}{label}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"


def _step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step_* folder, oldest first."""
    found = []
    for entry in ckpt_root.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _remove(path: Path) -> None:
    """Delete a folder by renaming it to a temp name first, so a crash midway leaves no half step_* dir."""
    trash = _tmp_dir(path.parent, "old-" + path.name)
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(ckpt_root: Path, step: int, groups: dict[str, dict[str, mx.array]], meta: dict,
                    keep: int) -> Path:
    """Write a checkpoint of `step` atomically, then prune all but the newest `keep`; returns its folder.

    Files are written into a temp folder inside `ckpt_root`, fsynced, and the folder renamed to
    `step_XXXXXXXX`. An existing folder of the same step is replaced (moved aside, then deleted).
    """
    if step < 0 or keep < 1:
        raise ValueError(f"need step >= 0 and keep >= 1, got step={step} keep={keep}")
    for name in groups:
        if not _GROUP_NAME.fullmatch(name) or name.endswith(SUFFIX):
            raise ValueError(f"group name {name!r} is not a plain file name")
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / step_dir_name(step)
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_dir(ckpt_root, final.name)
        tmp.mkdir()
    except OSError as exc:
        raise CheckpointError(f"cannot create checkpoint folder in {ckpt_root}: {exc.strerror or exc}",
                              hint="check that the run's output folder is writable") from None
    try:
        files: dict[str, dict[str, Any]] = {}
        for name, arrays in groups.items():
            path = tmp / f"{name}{SUFFIX}"
            mx.save_safetensors(str(path), {k: v if isinstance(v, mx.array) else mx.array(v)
                                            for k, v in arrays.items()})
            files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256_file(path, sync=True)}
        record = {"format": FORMAT_VERSION, "step": step, "created": time.time(),
                  "created_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "meta": meta, "files": files}
        try:
            text = json.dumps(record, indent=2, sort_keys=True) + "\n"
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint meta for step {step} is not JSON-serialisable: {exc}",
                                  hint="pass plain numbers, strings, lists and dicts in meta") from None
        with open(tmp / META_FILE, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            _remove(final)
        os.rename(tmp, final)
        _fsync_dir(ckpt_root)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"cannot write checkpoint {final}: {exc}",
                              hint="check free disk space and permissions of the run folder") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    prune_checkpoints(ckpt_root, keep, spare=final)
    return final


def prune_checkpoints(ckpt_root: Path, keep: int, *, spare: Path | None = None) -> None:
    """Delete all but the newest `keep` step_* folders (never `spare`); each goes by rename-then-delete."""
    for _, old in _step_dirs(Path(ckpt_root))[:-keep]:
        if old != spare:
            _remove(old)


# ---------------------------------------------------------------------------------------------
# Loading


def _read(path: Path) -> Checkpoint:
    """Load and verify one checkpoint folder; raises _Invalid with a short reason."""
    try:
        text = (path / META_FILE).read_text()
    except FileNotFoundError:
        raise _Invalid(f"{META_FILE} is missing (checkpoint incomplete)") from None
    except OSError as exc:
        raise _Invalid(f"{META_FILE} cannot be read: {exc.strerror or exc}") from None
    try:
        record = json.loads(text)
    except ValueError:
        raise _Invalid(f"{META_FILE} is not valid JSON (file altered or truncated)") from None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict) \
            or not isinstance(record.get("step"), int):
        raise _Invalid(f"{META_FILE} lacks 'step' or 'files'")
    if record.get("format") != FORMAT_VERSION:
        raise _Invalid(f"{META_FILE} has format {record.get('format')!r}, this macrun reads {FORMAT_VERSION}")
    groups: dict[str, dict[str, mx.array]] = {}
    for name, info in record["files"].items():
        if not _GROUP_NAME.fullmatch(name) or not name.endswith(SUFFIX) or not isinstance(info, dict):
            raise _Invalid(f"{META_FILE} lists a bad file entry {name!r}")
        file = path / name
        try:
            size = file.stat().st_size
        except OSError:
            raise _Invalid(f"{name} is missing") from None
        if size != info.get("bytes"):
            raise _Invalid(f"{name} is {size} bytes, {META_FILE} records {info.get('bytes')} "
                           "(file altered or truncated)")
        if _sha256_file(file) != info.get("sha256"):
            raise _Invalid(f"{name} sha256 mismatch (file altered or truncated)")
        try:
            arrays = mx.load(str(file))
            mx.eval(arrays)
        except (RuntimeError, ValueError, OSError) as exc:
            raise _Invalid(f"{name} cannot be read: {exc}") from None
        groups[name[: -len(SUFFIX)]] = arrays  # type: ignore[assignment]
    return Checkpoint(path=path, step=record["step"], groups=groups, meta=record.get("meta") or {})


def load_checkpoint(path: Path) -> Checkpoint:
    """Load a checkpoint folder, verifying every file's size and sha256 against meta.json."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist", hint="list the run's checkpoints folder")
    try:
        return _read(path)
    except _Invalid as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}", hint=_HINT) from None


def _is_abandoned(entry: Path) -> bool:
    """Whether a temp dir was left by a writer that is gone (a dead process on this host, or old)."""
    try:
        _, rest = entry.name[len(TMP_PREFIX):].split(".", 1)
        host, pid_text, _ = rest.rsplit(".", 2)
        pid = int(pid_text)
    except ValueError:
        return True
    if host == socket.gethostname():
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False
    try:
        return time.time() - entry.stat().st_mtime > STALE_TMP_SECONDS
    except OSError:
        return False


def latest_checkpoint(ckpt_root: Path, at_most: int | None = None) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint that verifies, and one warning line per newer one that was skipped.

    Temp folders are never considered; abandoned ones (their writer is gone) are deleted. With `at_most`,
    checkpoints of later steps are deleted unread: the launcher names the step a restart resumes from, and a
    later one left on a host belongs to an attempt it could not copy back (all ranks must start alike).
    """
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return None, []
    for entry in ckpt_root.iterdir():
        if entry.name.startswith(TMP_PREFIX) and _is_abandoned(entry):
            shutil.rmtree(entry, ignore_errors=True)
    skipped: list[tuple[str, str]] = []
    found: Checkpoint | None = None
    for step, path in reversed(_step_dirs(ckpt_root)):
        if at_most is not None and step > at_most:
            _remove(path)
            continue
        try:
            found = _read(path)
            break
        except _Invalid as exc:
            skipped.append((path.name, str(exc)))
    fallback = f"using {found.path.name}" if found else "no valid checkpoint left"
    return found, [f"{name}: {reason}; {fallback}" for name, reason in skipped]


# ---------------------------------------------------------------------------------------------
# Resuming with another world, and per-rank state


def stream_position(meta: dict, step: int, batch_size: int) -> int:
    """Windows of the data stream consumed before `step`, as recorded in a checkpoint's meta.

    Checkpoints written before the position was recorded are taken to have run with their own world
    size throughout (step x batch x world), which is what their sampler did.
    """
    recorded = meta.get("stream_position")
    if isinstance(recorded, int) and recorded >= 0:
        return recorded
    world = meta.get("world_size")
    return step * batch_size * (world if isinstance(world, int) and world > 0 else 1)


RANK_STATE_DIR = "rank_state"


def _rank_state_file(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / RANK_STATE_DIR / f"rank-{rank}{SUFFIX}"


def save_rank_state(run_dir: Path, rank: int, step: int, state: Any) -> Path:
    """Keep this rank's own optimizer state (DiLoCo's inner AdamW moments differ per rank) beside the run,
    on the rank's own host: one file per rank, replaced atomically at every checkpoint."""
    final = _rank_state_file(run_dir, rank)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f"{TMP_PREFIX}{final.name}.{os.getpid()}{SUFFIX}")
        mx.save_safetensors(str(tmp), flatten_tree(state), metadata={"step": str(step), "rank": str(rank)})
        os.replace(tmp, final)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"cannot write rank {rank}'s optimizer state to {final}: {exc}",
                              hint="check free disk space and permissions of the run folder") from None
    return final


def load_rank_state(run_dir: Path, rank: int, step: int, like: Any) -> Any | None:
    """This rank's own optimizer state saved at `step`, if it is there, readable and shaped like `like`;
    otherwise None (the caller keeps the state it has)."""
    path = _rank_state_file(run_dir, rank)
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)  # type: ignore[misc]
    except (OSError, RuntimeError, ValueError):
        return None
    expected = flatten_tree(like)
    if meta.get("step") != str(step) or set(arrays) != set(expected) or any(
            arrays[k].shape != expected[k].shape for k in expected):
        return None
    return unflatten_tree({k: arrays[k] for k in sorted(arrays)})

