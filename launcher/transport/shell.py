"""Words for the hosts' POSIX login shell: quoting, paths that start with `~`, environment exports.

Kept apart from launcher/transport/ssh.py (which imports paramiko) so that launcher/transport/ranks.py can quote its
command lines without that import, and so every rule here is a unit test.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping

from distributed.errors import ConfigError

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def shell_quote(arg: str) -> str:
    """Quote one argument for the remote login shell (POSIX `sh -c` rules)."""
    return shlex.quote(arg)


def shell_path(path: str) -> str:
    """Quote a path for the remote shell, keeping a leading `~` or `~/` as the host's home folder.

    hosts.json says `"python": "~/mlx/bin/python"`; quoted whole, the `~` would reach the host literally.
    `"$HOME"` is expanded by every POSIX shell and its value is never split or globbed inside the quotes.
    """
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        rest = path[2:]
        return '"$HOME"/' + (shlex.quote(rest) if rest else "")
    return shlex.quote(path)


def expand_home(path: str, home: str) -> str:
    """`path` with a leading `~` or `~/` replaced by `home` (the home folder on the host)."""
    return home + path[1:] if path == "~" or path.startswith("~/") else path


def check_env_names(env: Mapping[str, str]) -> None:
    """Raise ConfigError naming the first variable whose name a shell or `env` would misread.

    A name such as `A;rm -rf ~` would run as a command in an `export` line; `A=B` would set another variable.
    """
    for name in env:
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise ConfigError(f"environment variable name {name!r} is not valid",
                              hint="use letters, digits and _ only, not starting with a digit "
                                   "(e.g. MY_SETTING)")


def env_exports(env: Mapping[str, str] | None) -> str:
    """`export A='x' B='y z'; ` for a command prefix ("" when there is nothing); names are checked first."""
    if not env:
        return ""
    check_env_names(env)
    return "export " + " ".join(f"{k}={shell_quote(str(v))}" for k, v in env.items()) + "; "
