"""What `macrun run` carries to the hosts: the project around the script, so its imports and paths work there.

torchrun assumes every host shares a file system; a room of Macs does not. The folder the command was
typed in is copied to each host's job folder (the script's own folder when the script lies outside it),
and ranks start at the same place inside the copy, so `import helper`, `python -m pkg.mod` and relative
paths such as `data/train.txt` behave as they do here. The copy is content-addressed (launcher.transport.sync): a
second launch sends only what changed.

What is left out: whatever a git work tree ignores (`git ls-files`), version-control folders, virtual
environments, `runs/` and caches, and files over a size limit (named, with the flag that adds them).
A folder too large to be a project (a home folder, say) is refused rather than copied.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from distributed.errors import UsageError

REMOTE_ROOT = "project"  # inside the job folder on each host
MAX_FILE_BYTES = 50_000_000  # larger files (datasets, weights) are skipped unless named with --sync
MAX_FILES = 5000  # beyond these the folder is not a project: refuse instead of copying a home folder
MAX_TOTAL_BYTES = 2_000_000_000
SKIPPED_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__", "runs", "node_modules", ".mypy_cache",
                          ".pytest_cache", ".ruff_cache", ".tox", ".nox", ".ipynb_checkpoints", ".cache",
                          ".venv", "venv", ".idea", ".vscode"})
SKIPPED_FILES = frozenset({".DS_Store"})
# Python options that take the next word as their value (python -W error script.py).
_PYTHON_VALUE_OPTIONS = frozenset({"-W", "-X", "--check-hash-based-pycs"})


@dataclass(frozen=True)
class Project:
    """The files to copy and how ranks start among them (relative paths are POSIX, inside REMOTE_ROOT)."""

    root: Path | None  # the local folder copied; None with --no-sync
    files: dict[str, Path]  # path on the host, relative to the job folder -> local file
    argv: list[str]  # the command with paths inside the project made relative to where ranks start
    workdir: str  # where ranks start: relative to the job folder, or absolute with --no-sync
    skipped_large: list[str] = field(default_factory=list)  # relative paths over MAX_FILE_BYTES
    notes: list[str] = field(default_factory=list)
    total_bytes: int = 0  # of `files`

    def summary(self) -> str:
        """One line: what will be carried and what was left out."""
        if self.root is None:
            return f"project: not copied (--no-sync): ranks start in {self.workdir}"
        text = f"project {_display(self.root)}: {len(self.files)} file(s), {_size(self.total_bytes)} to keep in sync"
        if self.skipped_large:
            names = ", ".join(self.skipped_large[:3]) + (f" and {len(self.skipped_large) - 3} more"
                                                         if len(self.skipped_large) > 3 else "")
            text += f"; skipped over {_size(MAX_FILE_BYTES)}: {names} (add one with --sync PATH)"
        return text


def plan_project(argv: Sequence[str], *, cwd: Path | None = None, extra: Sequence[Path] = (),
                 sync: bool = True) -> Project:
    """Decide what `argv` needs on the hosts (see the module docstring); reads files, starts nothing remote."""
    cwd = (cwd or Path.cwd()).resolve()
    argv = list(argv)
    script, module = _script_of(argv, cwd)
    if not sync:
        if extra:
            raise UsageError("--sync and --no-sync together", hint="use one: --no-sync when the hosts already "
                                                                   "have the project at the same path")
        return Project(root=None, files={}, argv=argv, workdir=str(cwd))
    if script is not None and not _is_within(script, cwd):
        root = script.parent
        notes = [f"{script.name} lies outside {_display(cwd)}: copying its folder, where ranks start"]
    else:
        root = cwd
        notes = [] if module or script else [f"no script on the command line: copying {_display(cwd)}"]
    listed, skipped_large = _project_files(root)
    files = {_remote(rel): root / rel for rel in listed}
    for path in extra:
        _add_extra(files, path.expanduser(), root, notes)
    total = sum(p.stat().st_size for p in files.values())
    if len(files) > MAX_FILES or total > MAX_TOTAL_BYTES:
        raise UsageError(f"{_display(root)} holds {len(files):,} files ({_size(total)}): too much to copy to every "
                         f"host as a project",
                         hint="run from the project's own folder, or pass --no-sync when the hosts already have it")
    return Project(root=root, files=files, argv=_rewrite(argv, root, cwd), workdir=REMOTE_ROOT,
                   skipped_large=skipped_large, notes=notes, total_bytes=total)


def _script_of(argv: list[str], cwd: Path) -> tuple[Path | None, str | None]:
    """(the script file, the -m module) that argv runs, where there is one."""
    if not argv:
        return None, None
    if Path(argv[0]).name.startswith("python"):
        words = iter(argv[1:])
        for word in words:
            if word == "-m":
                return None, next(words, None)
            if word == "-c" or word == "-":
                return None, None
            if word in _PYTHON_VALUE_OPTIONS:
                next(words, None)
                continue
            if word.startswith("-"):
                continue
            path = (cwd / word).resolve()
            return (path if path.is_file() else None), None
        return None, None
    path = (cwd / argv[0]).resolve()
    return (path if path.is_file() and os.sep in argv[0] else None), None


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _project_files(root: Path) -> tuple[list[str], list[str]]:
    """Relative paths to copy, and those skipped for their size: git's view where root is in a work tree."""
    listed = _git_files(root)
    if listed is None:
        listed = []
        for file in _walk(root):
            listed.append(str(file.relative_to(root)))
            if len(listed) > MAX_FILES:
                break
    skipped: dict[Path, bool] = {}  # folder -> _skipped_dir, each looked at once

    def hidden(folder: Path) -> bool:
        if folder == root:
            return False
        if folder not in skipped:
            skipped[folder] = hidden(folder.parent) or _skipped_dir(folder)
        return skipped[folder]

    keep, large = [], []
    for rel in listed:
        path = root / rel
        if path.name in SKIPPED_FILES or hidden(path.parent):
            continue
        try:
            st = path.lstat()
        except OSError:
            continue  # deleted but still tracked: nothing to copy
        if not stat.S_ISREG(st.st_mode):
            continue  # a link could point anywhere on this machine: not copied
        (large if st.st_size > MAX_FILE_BYTES else keep).append(rel)
    return keep, large


def _walk(folder: Path) -> Iterator[Path]:
    """Every file below `folder`, skipped folders left out (not opened at all)."""
    for here, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not _skipped_dir(Path(here) / d))
        for name in sorted(names):
            if name not in SKIPPED_FILES:
                yield Path(here) / name


def _git_files(root: Path) -> list[str] | None:
    """Tracked and untracked-but-not-ignored files under root (relative to it); None outside a work tree."""
    try:
        done = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root,
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return sorted({n for n in done.stdout.decode("utf-8", "surrogateescape").split("\0") if n})


def _skipped_dir(path: Path) -> bool:
    """A folder never worth copying: by name, or a virtual environment whatever its name."""
    return path.name in SKIPPED_DIRS or (path / "pyvenv.cfg").is_file()


def _remote(rel: str | Path) -> str:
    return str(PurePosixPath(REMOTE_ROOT, *Path(rel).parts))


def _add_extra(files: dict[str, Path], path: Path, root: Path, notes: list[str]) -> None:
    """--sync PATH: a file or folder, kept at its place in the project or, from elsewhere, under its name."""
    path = path.resolve()
    if not path.exists():
        raise UsageError(f"--sync {path}: no such file or folder", hint="name a file or folder on this machine")
    base = root if _is_within(path, root) else path.parent
    if base != root:
        notes.append(f"--sync {_display(path)}: outside the project, copied as {path.name} beside it")
    if path.is_file():
        files[_remote(path.relative_to(base))] = path
        return
    for file in _walk(path):
        if stat.S_ISREG(file.lstat().st_mode):  # not a link
            files[_remote(file.relative_to(base))] = file


def _rewrite(argv: list[str], root: Path, cwd: Path) -> list[str]:
    """The command as ranks run it from the copy of `root`: words naming something inside the project
    become relative to root (those already right, relative ones typed in root itself, stay as typed)."""
    out = argv[:1]
    for word in argv[1:]:
        if word.startswith("-") or not word:
            out.append(word)
            continue
        path = (cwd / word).resolve()
        if not path.exists() or not _is_within(path, root) or (root == cwd and not Path(word).is_absolute()):
            out.append(word)
        else:
            out.append(os.path.relpath(path, root))
    return out


def _display(path: Path) -> str:
    home = Path.home()
    return "~/" + str(path.relative_to(home)) if _is_within(path, home) and path != home else str(path)


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
