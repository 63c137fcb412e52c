"""What `macrun` imports before it connects: a launch's CPU is mostly imports (benchmarks/launch.py).

Each check runs in a fresh interpreter, as the console script does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Imports everything `macrun run --hosts` needs up to starting ranks, the way the console script does.
LOADED = """
import json, sys
import launcher  # noqa: F401  (defers invoke before anything imports paramiko)
import launcher.cli, launcher.jobs.api, launcher.jobs.remote, launcher.jobs.project
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in
                        ("invoke", "unittest", "mlx", "numpy", "mlx_lm", "questionary", "zeroconf"))))
"""  # "invoke" itself is the stand-in; any invoke.* submodule would mean the real one was loaded

MATCH_EXEC = """
import sys
import launcher  # noqa: F401  (defers invoke before anything imports paramiko)
import paramiko
text = 'Match exec "true"\\n  User yes\\nMatch exec "false"\\n  Port 2222\\nHost *\\n  Port 22\\n'
found = paramiko.SSHConfig.from_text(text).lookup("studio")
print(found.get("user"), found.get("port"))
"""


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_launch_imports_neither_invoke_nor_mlx_nor_the_wizard() -> None:
    assert json.loads(run_python(LOADED)) == ["invoke"]


def test_ssh_config_match_exec_still_runs_with_invoke_deferred() -> None:
    assert run_python(MATCH_EXEC) == "yes 22"
