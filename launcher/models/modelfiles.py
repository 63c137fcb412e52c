"""The mlx-lm model on every host: this machine's model folder as a manifest, and where each host holds the same.

The manifest lists the files mlx-lm reads from the folder (its top level, `MODEL_FILES`: config.json,
model*.safetensors, tokenizer files; a README or an `original/` folder is neither compared nor copied) with
their size and SHA-256. Hashing gigabytes takes seconds, so digests are cached by (real path, size, mtime):
here in ~/.cache/macrun/model-hashes.json, on a host in `<workdir>/models/.hashes.json`.

One remote command per host (`_REMOTE_CHECK`) looks for the model, in order:
  1. at `model.path` (`~` meaning the host's home), or for a repo name in the host's Hugging Face cache
     (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else ~/.cache/huggingface/hub: `models--org--name/snapshots/*`,
     the revision refs/main names first; variables count only where a non-interactive SSH session sets them);
  2. in macrun's store, `<workdir>/models/<manifest digest>/`, where `--push-model` copies it (modelpush.py).
For each folder it compares sizes and hashes only the files whose size matches; the first folder that
matches every file is the one the host's ranks load (env MACRUN_MODEL_DIR).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from distributed.errors import HostError
from distributed.models.mlxlm_memory import MemoryEstimate
from launcher.room.jsoncache import cache_file, read_cache, write_cache
from launcher.transport.shell import shell_path, shell_quote
from launcher.transport.ssh import SSHConnection
from launcher.transport.sync import file_digest

CHECK_TIMEOUT_S = 900.0  # a first look hashes the model on the host: 20 GB on a slow disk
_QUIET_HASH_BYTES = 256 << 20  # hashing more than this here says so first
_HF_SNAPSHOT = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/")


@dataclass(frozen=True, slots=True)
class ModelFile:
    rel: str  # name in the model folder
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Manifest:
    """The files of a model folder that mlx-lm reads, sorted by name."""

    files: tuple[ModelFile, ...]

    @property
    def digest(self) -> str:
        """SHA-256 of the list: names the model's folder in a host's store."""
        text = json.dumps([[f.rel, f.size, f.sha256] for f in self.files], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The mlx-lm model every host must hold, as this machine has it."""

    name: str  # model.path as written: a folder or a Hugging Face repo name
    local_dir: Path  # where this machine has it
    manifest: Manifest
    push: bool = False  # --push-model: copy it to hosts that lack it or hold another version
    memory: MemoryEstimate | None = None  # per rank, checked against each host's memory before anything else

    def host_candidates(self) -> list[str]:
        """Where to look on a host: a folder (`~` expanded there) and/or `hf:org/name` (its Hugging Face cache)."""
        local = Path(self.name).expanduser()
        if not local.exists():  # resolve_model_path found it in this machine's cache: a repo name
            return [f"hf:{self.name}"]
        folder = self.name if self.name.startswith(("~", "/")) else str(self.local_dir.resolve())
        repo = _HF_SNAPSHOT.search(str(self.local_dir.resolve()))
        return [folder] + ([f"hf:{repo.group(1)}/{repo.group(2)}"] if repo else [])


@dataclass(frozen=True, slots=True)
class FolderState:
    """One folder the host looked in: which manifest files it lacks or holds with other contents."""

    dir: str
    exists: bool
    missing: tuple[str, ...] = ()
    different: tuple[str, ...] = ()
    parts: Mapping[str, int] = field(default_factory=dict)  # rel -> bytes of an unfinished upload (store)


@dataclass(frozen=True, slots=True)
class HostModel:
    """What one host has: `found`, the folder holding the same model (None: none does), and its store."""

    host: str
    found: str | None
    store: str  # <workdir>/models/<digest>, absolute on the host
    looked: tuple[FolderState, ...]

    @property
    def store_state(self) -> FolderState:
        return next((s for s in self.looked if s.dir == self.store), FolderState(self.store, False))

    @property
    def lacks(self) -> bool:
        """No folder it looked in exists (macrun's store aside): the model is not there at all."""
        return not any(s.exists and s.dir != self.store for s in self.looked)

    def describe_miss(self) -> str:
        """'h2 lacks it (looked in /x)' or 'h3 holds another version (model.safetensors differs at /y)'."""
        if self.lacks:
            return f"{self.host} lacks it (looked in {' and '.join(s.dir for s in self.looked if s.dir != self.store)})"
        s = next(s for s in self.looked if s.exists and s.dir != self.store)
        files = list(s.different) + [f"{rel} (missing)" for rel in s.missing]
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        return f"{self.host} holds another version ({shown} differ{'s' if len(files) == 1 else ''} at {s.dir})"


def _cache_path() -> Path:
    return cache_file("model-hashes.json")


def model_files(folder: Path) -> list[Path]:
    """The files of `folder` mlx-lm reads (its top level, matching MODEL_FILES), sorted."""
    from distributed.models.mlxlm import MODEL_FILES

    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and any(fnmatch.fnmatch(p.name, pattern) for pattern in MODEL_FILES))


def local_manifest(folder: Path, emit: Callable[[str], None] = lambda _line: None) -> Manifest:
    """The manifest of this machine's model folder; digests come from the cache where size and mtime match."""
    cache, fresh = read_cache(_cache_path()), []
    files: list[ModelFile] = []
    stats = [(p, os.path.realpath(p), p.stat()) for p in model_files(folder)]
    todo = [(p, real, st) for p, real, st in stats if (cache.get(real) or [None])[:2] != [st.st_size, st.st_mtime_ns]]
    if sum(st.st_size for _, _, st in todo) > _QUIET_HASH_BYTES:
        emit(f"hashing {len(todo)} model file(s) of {folder} once "
             f"({sum(st.st_size for _, _, st in todo) / 1e9:.1f} GB; later launches reuse the result)")
    for path, real, st in stats:
        entry = cache.get(real)
        if not (isinstance(entry, list) and entry[:2] == [st.st_size, st.st_mtime_ns]):
            entry = cache[real] = [st.st_size, st.st_mtime_ns, file_digest(path)]
            fresh.append(real)
        files.append(ModelFile(path.name, st.st_size, str(entry[2])))
    if fresh:
        write_cache(_cache_path(), {k: v for k, v in cache.items() if os.path.exists(k)})
    return Manifest(tuple(files))


# Runs on the host (Python 3.9+): stdin {"workdir", "digest", "candidates", "files": [[rel, size, sha]],
# "make_store"}; prints {"found", "store", "looked": [{"dir", "exists", "missing", "different", "parts"}]}.
_REMOTE_CHECK = r"""
import hashlib, json, os, sys
req = json.load(sys.stdin)
os.umask(0o077)
models = os.path.join(os.path.abspath(os.path.expanduser(req["workdir"])), "models")
store = os.path.join(models, req["digest"])
cache_path = os.path.join(models, ".hashes.json")
try:
    with open(cache_path) as f:
        cache = json.load(f)
    cache = cache if isinstance(cache, dict) else {}
except (OSError, ValueError):
    cache = {}
dirty = []

def sha256(path, st):
    key = os.path.realpath(path)
    hit = cache.get(key)
    if isinstance(hit, list) and hit[:2] == [st.st_size, st.st_mtime_ns]:
        return hit[2]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    cache[key] = [st.st_size, st.st_mtime_ns, digest.hexdigest()]
    dirty.append(key)
    return cache[key][2]

def folders(candidate):
    if not candidate.startswith("hf:"):
        return [os.path.abspath(os.path.expanduser(candidate))]
    home = os.environ.get("HF_HOME") or "~/.cache/huggingface"
    hub = os.path.expanduser(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub"))
    repo = os.path.join(hub, "models--" + candidate[3:].replace("/", "--"))
    snaps = os.path.join(repo, "snapshots")
    try:
        names = sorted(os.listdir(snaps))
    except OSError:
        return [snaps]
    try:
        with open(os.path.join(repo, "refs", "main")) as f:
            main = f.read().strip()
        names.sort(key=lambda n: n != main)
    except OSError:
        pass
    return [os.path.join(snaps, n) for n in names] or [snaps]

if req.get("make_store"):
    os.makedirs(store, exist_ok=True)
looked, found = [], None
for folder in [f for c in req["candidates"] for f in folders(c)] + [store]:
    state = {"dir": folder, "exists": os.path.isdir(folder), "missing": [], "different": [], "parts": {}}
    looked.append(state)
    if not state["exists"]:
        continue
    for rel, size, sha in req["files"]:
        path = os.path.join(folder, rel)
        try:
            st = os.stat(path)
            if st.st_size != size or sha256(path, st) != sha:
                state["different"].append(rel)
        except OSError:
            state["missing"].append(rel)
        try:
            state["parts"][rel] = os.stat(path + ".part").st_size
        except OSError:
            pass
    if not state["missing"] and not state["different"]:
        found = folder
        break
if dirty:
    try:
        os.makedirs(models, exist_ok=True)
        tmp = "%s.tmp-%d" % (cache_path, os.getpid())
        with open(tmp, "w") as f:
            json.dump({k: v for k, v in cache.items() if os.path.exists(k)}, f)
        os.replace(tmp, cache_path)
    except OSError:
        pass
print(json.dumps({"found": found, "store": store, "looked": looked}))
"""


def check_model(conn: SSHConnection, spec: ModelSpec, *, store_only: bool = False,
                make_store: bool = False) -> HostModel:
    """Ask one host (one command) where it holds `spec`'s model; `store_only` looks in macrun's store alone."""
    request = {"workdir": conn.host.workdir, "digest": spec.manifest.digest, "make_store": make_store,
               "candidates": [] if store_only else spec.host_candidates(),
               "files": [[f.rel, f.size, f.sha256] for f in spec.manifest.files]}
    python = conn.host.python
    result = conn.run(f"{shell_path(python)} -c {shell_quote(_REMOTE_CHECK)}", stdin=json.dumps(request).encode(),
                      timeout=CHECK_TIMEOUT_S)
    try:
        answer = json.loads(result.stdout)
        looked = tuple(FolderState(str(s["dir"]), bool(s["exists"]), tuple(s["missing"]), tuple(s["different"]),
                                   {str(k): int(v) for k, v in s["parts"].items()}) for s in answer["looked"])
        return HostModel(conn.host.name, answer["found"], str(answer["store"]), looked)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise HostError(f"cannot look for the model on {conn.host.name} (exit status {result.rc}): {tail}",
                        hint=f"check that \"workdir\" for {conn.host.name} in hosts.json is writable") from exc


def check_models(conns: Sequence[SSHConnection], spec: ModelSpec) -> dict[str, HostModel]:
    """`check_model` on every host in parallel, keyed by host name."""
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(conns)))) as pool:
        futures = {c.host.name: pool.submit(check_model, c, spec) for c in conns}
    return {name: fut.result() for name, fut in futures.items()}


def missing_model_error(spec: ModelSpec, misses: Sequence[HostModel]) -> HostError:
    """One error for every host that lacks the model or holds another version, with the fix."""
    size = spec.manifest.total_bytes
    return HostError(f"the model {spec.name} is not the same on every host: "
                     + "; ".join(m.describe_miss() for m in misses),
                     hint=f"add --push-model to copy it from this machine ({len(spec.manifest.files)} files, "
                          f"{size / 1e6:,.1f} MB) into each host's <workdir>/models/ (only what differs is sent), "
                          f"or put the same files at {spec.name} on {', '.join(m.host for m in misses)}")
