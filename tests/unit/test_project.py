"""What `macrun run` copies to the hosts (launcher.jobs.project): the project, not the script alone."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from distributed.errors import UsageError
from launcher.jobs import project as project_mod
from launcher.jobs.project import REMOTE_ROOT, plan_project


def make(root: Path, files: dict[str, str | bytes]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)


def remote(*rels: str) -> set[str]:
    return {f"{REMOTE_ROOT}/{r}" for r in rels}


def test_the_folder_typed_in_travels_with_what_the_script_imports(tmp_path: Path) -> None:
    make(tmp_path, {"train.py": "import helper\n", "helper.py": "X = 1\n", "data/train.txt": "hello\n",
                    "pkg/__init__.py": "", "pkg/mod.py": "", "runs/old/log.txt": "x", "pkg/__pycache__/m.pyc": "x",
                    ".DS_Store": "x"})
    project = plan_project(["python", "train.py", "--data", "data/train.txt"], cwd=tmp_path)
    assert set(project.files) == remote("train.py", "helper.py", "data/train.txt", "pkg/__init__.py", "pkg/mod.py")
    assert project.files[f"{REMOTE_ROOT}/helper.py"] == tmp_path / "helper.py"
    # Ranks start in the copy of this folder, so the command runs unchanged.
    assert project.argv == ["python", "train.py", "--data", "data/train.txt"] and project.workdir == REMOTE_ROOT
    assert project.root == tmp_path and not project.notes


def test_python_dash_m_copies_the_package(tmp_path: Path) -> None:
    make(tmp_path, {"pkg/__init__.py": "", "pkg/train.py": "from pkg import util\n", "pkg/util.py": ""})
    project = plan_project(["python", "-u", "-m", "pkg.train", "--steps", "3"], cwd=tmp_path)
    assert set(project.files) == remote("pkg/__init__.py", "pkg/train.py", "pkg/util.py")
    assert project.argv == ["python", "-u", "-m", "pkg.train", "--steps", "3"]


def test_virtual_environments_and_version_control_stay_behind(tmp_path: Path) -> None:
    make(tmp_path, {"train.py": "", "env311/pyvenv.cfg": "home = /usr\n", "env311/lib/site.py": "",
                    ".venv/bin/python": "", ".git/HEAD": "ref", "node_modules/a.js": ""})
    assert set(plan_project(["python", "train.py"], cwd=tmp_path).files) == remote("train.py")


def test_gitignore_is_respected_inside_a_work_tree(tmp_path: Path) -> None:
    make(tmp_path, {"train.py": "", "notes.md": "", "secret.env": "TOKEN=1", "out/model.bin": b"\0",
                    ".gitignore": "secret.env\nout/\n"})
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "add", "train.py"], check=True)
    files = plan_project(["python", "train.py"], cwd=tmp_path).files
    # Tracked and untracked-but-not-ignored files go; ignored ones and .git do not.
    assert set(files) == remote("train.py", "notes.md", ".gitignore")


def test_large_files_are_named_and_sync_brings_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(project_mod, "MAX_FILE_BYTES", 1000)
    make(tmp_path, {"train.py": "", "weights/big.safetensors": b"\0" * 2000, "small.txt": "s"})
    project = plan_project(["python", "train.py"], cwd=tmp_path)
    assert set(project.files) == remote("train.py", "small.txt")
    assert project.skipped_large == ["weights/big.safetensors"]
    line = project.summary()
    assert "weights/big.safetensors" in line and "--sync PATH" in line and "\n" not in line
    project = plan_project(["python", "train.py"], cwd=tmp_path, extra=[tmp_path / "weights"])
    assert f"{REMOTE_ROOT}/weights/big.safetensors" in project.files


def test_sync_from_outside_the_project_lands_beside_it(tmp_path: Path) -> None:
    make(tmp_path, {"proj/train.py": "", "shared/vocab.json": "{}", "shared/.venv/pyvenv.cfg": ""})
    project = plan_project(["python", "train.py"], cwd=tmp_path / "proj", extra=[tmp_path / "shared"])
    assert set(project.files) == remote("train.py", "shared/vocab.json")
    assert any("outside the project" in n for n in project.notes)
    with pytest.raises(UsageError, match="no such file"):
        plan_project(["python", "train.py"], cwd=tmp_path / "proj", extra=[tmp_path / "missing"])


def test_a_script_elsewhere_brings_its_own_folder(tmp_path: Path) -> None:
    make(tmp_path, {"code/train.py": "import helper\n", "code/helper.py": "", "code/cfg.yaml": "", "here/x": ""})
    script = tmp_path / "code" / "train.py"
    project = plan_project(["python", str(script), "--config", str(tmp_path / "code" / "cfg.yaml"), "7"],
                           cwd=tmp_path / "here")
    assert project.root == tmp_path / "code"
    assert set(project.files) == remote("train.py", "helper.py", "cfg.yaml")
    assert project.argv == ["python", "train.py", "--config", "cfg.yaml", "7"]
    assert project.notes and "outside" in project.notes[0]


def test_absolute_paths_inside_the_project_become_relative(tmp_path: Path) -> None:
    make(tmp_path, {"train.py": "", "data/a.txt": ""})
    project = plan_project(["python", str(tmp_path / "train.py"), str(tmp_path / "data" / "a.txt"), "/etc"],
                           cwd=tmp_path)
    assert project.argv == ["python", "train.py", os.path.join("data", "a.txt"), "/etc"]


def test_links_are_not_followed(tmp_path: Path) -> None:
    make(tmp_path, {"train.py": "", "elsewhere/secret": "s"})
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "train.py").write_text("")
    (tmp_path / "proj" / "leak").symlink_to(tmp_path / "elsewhere" / "secret")
    assert set(plan_project(["python", "train.py"], cwd=tmp_path / "proj").files) == remote("train.py")


def test_a_home_sized_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(project_mod, "MAX_FILES", 5)
    make(tmp_path, {f"f{i}.txt": "" for i in range(8)})
    with pytest.raises(UsageError, match="too much to copy") as exc:
        plan_project(["python", "-c", "pass"], cwd=tmp_path)
    assert "--no-sync" in (exc.value.hint or "")


def test_no_sync_copies_nothing_and_starts_where_typed(tmp_path: Path) -> None:
    make(tmp_path, {"train.py": ""})
    project = plan_project(["python", "train.py"], cwd=tmp_path, sync=False)
    assert project.files == {} and project.workdir == str(tmp_path) and project.argv == ["python", "train.py"]
    assert "--no-sync" in project.summary()
    with pytest.raises(UsageError, match="--sync and --no-sync"):
        plan_project(["python", "train.py"], cwd=tmp_path, sync=False, extra=[tmp_path / "train.py"])
