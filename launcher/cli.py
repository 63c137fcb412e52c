"""The `macrun` command line: a thin Typer layer over the launcher API.

Library code raises MacrunError; only here do errors become one `error:` line and one `hint:` line on
stderr with the documented exit code (MACRUN_DEBUG=1 shows the traceback instead).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from distributed.errors import MacrunError, UsageError

app = typer.Typer(
    name="macrun",
    help="Train one MLX model on several Macs at once: torchrun for a room full of Macs.\n\n"
         "With no --hosts everything runs on this machine with local ranks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
hosts_app = typer.Typer(help="Check and trust the machines in a hosts file; set up their Thunderbolt cables.",
                        no_args_is_help=True)
config_app = typer.Typer(help="Show configs and every config key.", no_args_is_help=True)
app.add_typer(hosts_app, name="hosts")
app.add_typer(config_app, name="config")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

HostsOpt = Annotated[Path | None, typer.Option("--hosts", help="hosts.json (or an MLX hostfile); "
                                                "without it, ranks run on this machine.")]
NprocOpt = Annotated[int, typer.Option("--nproc", "-n", min=1, help="Local ranks when there is no --hosts.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", metavar="KEY=VALUE",
                                                  help="Override a config key, e.g. --set train.steps=200.")]
LinkOpt = Annotated[str, typer.Option("--link", help="Where the ring runs: auto (Thunderbolt when every neighbour "
                                      "pair shares a cable, else the network), thunderbolt (required) or network.")]
BackendOpt = Annotated[str | None, typer.Option("--backend", help="Collectives: auto (jaccl, RDMA over Thunderbolt 5, "
                                               "when every pair of Macs has it, else the TCP ring; the reason is "
                                               "printed), ring, jaccl (full mesh) or jaccl-ring (neighbours).")]
TrustOpt = Annotated[bool, typer.Option("--accept-new-host-keys",
                                        help="Trust hosts whose SSH key is not in known_hosts yet (TOFU).")]


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn MacrunError into `error:`/`hint:` lines and its exit code."""
    try:
        yield
    except MacrunError as exc:
        if os.environ.get("MACRUN_DEBUG"):
            raise
        # escape(): messages quote user text and commands (`pip install 'mlx[cpu]'`) that rich would
        # otherwise read as markup tags and silently drop.
        err.print(f"[bold red]error:[/] {escape(exc.message)}", markup=True)
        if exc.hint:
            err.print(f"[bold]hint:[/] {escape(exc.hint)}", markup=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


def _emit(line: str) -> None:
    out.print(line, markup=False)


def _load_hosts(path: Path | None) -> Any:
    if path is None:
        return None
    from launcher.room.hosts import load_hosts

    return load_hosts(path)


def _check_link(link: str) -> str:
    if link not in ("auto", "thunderbolt", "network"):
        raise UsageError(f"--link {link!r} is not one of auto, thunderbolt, network")
    return link


def _check_backend(backend: str) -> str:
    from launcher.thunderbolt.backend import check_backend

    return check_backend(backend)


def _finish(result: Any) -> None:
    from launcher.jobs.job import render_failure_table

    if result.exit_code != 0 and not getattr(result, "stopped_gracefully", False):
        err.print(render_failure_table(result))
    raise typer.Exit(result.exit_code)


@app.command(context_settings={"allow_extra_args": False})
def train(
    config: Annotated[Path, typer.Argument(help="A YAML config, e.g. configs/quickstart.yaml.")],
    hosts: HostsOpt = None,
    nproc: NprocOpt = 1,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest valid checkpoint.")] = False,
    stop_at: Annotated[int | None, typer.Option("--stop-at", min=1, help="End early at this step, "
                                                "with a checkpoint (resume later with --resume).")] = None,
    link: LinkOpt = "auto",
    backend: BackendOpt = None,
    accept_new_host_keys: TrustOpt = False,
    max_restarts: Annotated[int | None, typer.Option("--max-restarts", min=0, help="Restarts after a failure (a "
                                                     "crashed rank, a lost host, a stuck run), each from the last "
                                                     "checkpoint on the hosts still there (fault.max_restarts, "
                                                     "default 3).")] = None,
    min_hosts: Annotated[int | None, typer.Option("--min-hosts", min=1, help="Stop (exit 4, checkpoint kept) "
                                                  "rather than go on with fewer hosts (fault.min_hosts, "
                                                  "default 1).")] = None,
    push_model: Annotated[bool, typer.Option("--push-model", help="mlx-lm fine-tunes: copy this machine's model "
                                             "to each host that lacks it or holds another version, into "
                                             "<workdir>/models/ (only what differs; an interrupted copy "
                                             "continues).")] = False,
) -> None:
    """Train a model: one rank per host slot (or --nproc local ranks); checkpoints and logs in runs/<name>.

    A failure restarts the run from its last checkpoint on the hosts that remain (--max-restarts). The first Ctrl-C saves a checkpoint at the next sync and stops; a second stops at once.

    Examples: macrun train configs/quickstart.yaml · macrun train --nproc 2 configs/quickstart.yaml --set train.steps=200 · macrun train --hosts hosts.json configs/small.yaml --resume
    """
    overrides = list(set_ or [])
    if max_restarts is not None:
        overrides.append(f"fault.max_restarts={max_restarts}")
    if min_hosts is not None:
        overrides.append(f"fault.min_hosts={min_hosts}")
    with user_errors():
        if backend is not None:  # the command line wins over strategy.backend in the config
            overrides.append(f"strategy.backend={_check_backend(backend)}")
        from launcher.jobs.training import train_job
        from launcher.views.display import TrainingDisplay

        with TrainingDisplay(out) as display:
            result = train_job(config, overrides, hosts=_load_hosts(hosts), nproc=nproc, resume=resume,
                               stop_at=stop_at, accept_new_host_keys=accept_new_host_keys, link=_check_link(link),
                               push_model=push_model, emit=display.emit, resume_command=_resume_command(),
                               transfers=display.transfers)
    _finish(result)


def _resume_command() -> str:
    """The command that continues this run: the one typed, with --resume."""
    import shlex

    args = [a for a in sys.argv[1:] if a != "--resume"]
    return "macrun " + shlex.join([*args, "--resume"])


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             options_metavar="[OPTIONS] -- COMMAND [ARGS]...")
def run(
    ctx: typer.Context,
    hosts: HostsOpt = None,
    nproc: NprocOpt = 1,
    name: Annotated[str, typer.Option(help="Job folder name on the hosts and under runs/.")] = "run",
    sync: Annotated[list[Path] | None, typer.Option("--sync", metavar="PATH", help="Also copy this file or folder "
                                                     "to the hosts (repeatable; no size limit).")] = None,
    no_sync: Annotated[bool, typer.Option("--no-sync", help="Copy nothing: the hosts already have the project at "
                                          "the same path (a shared folder); ranks start there.")] = False,
    link: LinkOpt = "auto",
    backend: BackendOpt = None,
    accept_new_host_keys: TrustOpt = False,
) -> None:
    """Run any command on every rank, torchrun-style: macrun run [--hosts hosts.json] -- python script.py ARGS

    Each rank gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, MLX_RANK and MLX_HOSTFILE, so an unmodified mx.distributed (ring) or torch env:// script works.

    With --hosts, the folder you run from is copied to each host (only what changed; .gitignore respected; .git, virtual environments, runs/, caches and files over 50 MB left out) and ranks start at the same place in the copy, so imports of modules beside the script, python -m package.module and relative paths work as here. A leading `python` runs each host's configured interpreter.
    """
    argv = list(ctx.args)
    with user_errors():
        if not argv:
            raise UsageError("no command given", hint="put it after --, e.g. macrun run -- python script.py")
        from distributed.config import validate_run_name
        from launcher.jobs.api import LaunchSpec, launch
        from launcher.room.hosts import load_hosts

        name = validate_run_name(name, what="--name")
        host_list = load_hosts(hosts) if hosts else None
        files: dict[str, Path] = {}
        workdir = ""
        if host_list:
            from launcher.jobs.project import plan_project

            project = plan_project(argv, extra=sync or [], sync=not no_sync)
            for note in project.notes:
                _emit(f"note: {note}")
            _emit(project.summary())
            files, argv, workdir = project.files, project.argv, project.workdir
        elif sync or no_sync:
            _emit("note: --sync/--no-sync apply to --hosts runs; local ranks run here, in this folder")
        spec = LaunchSpec(argv=argv, run_dir=Path("runs").resolve() / name, name=name, hosts=host_list,
                          nproc=nproc, files=files, workdir=workdir, accept_new_host_keys=accept_new_host_keys,
                          link=_check_link(link), backend=_check_backend(backend or "auto"))
        result = launch(spec, emit=_emit)
    _finish(result)


@hosts_app.command("check")
def hosts_check(
    hosts: Annotated[Path, typer.Option("--hosts", help="The hosts file to check.")] = Path("hosts.json"),
    accept_new_host_keys: TrustOpt = False,
) -> None:
    """Connect to every host and show what it has (Python, MLX, chip, memory, links); start nothing."""
    with user_errors():
        from launcher.jobs.remote import check_hosts_file

        table, problems = check_hosts_file(_load_hosts(hosts), accept_new_host_keys=accept_new_host_keys)
        out.print(table)
        if problems:
            from launcher.room.preflight import raise_for_problems

            raise_for_problems(problems)


@hosts_app.command("trust")
def hosts_trust(
    name: Annotated[str, typer.Argument(help="The host's name in the hosts file.")],
    hosts: Annotated[Path, typer.Option("--hosts", help="The hosts file.")] = Path("hosts.json"),
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Add the key without asking (only once you have "
                                      "compared its fingerprint with the host's own).")] = False,
) -> None:
    """Fetch a host's SSH key, show its fingerprint and, once you confirm it, add it to ~/.ssh/known_hosts."""
    with user_errors():
        from launcher.transport.ssh import describe_key, fetch_host_key

        matches = [h for h in _load_hosts(hosts) if h.name == name]
        if not matches:
            raise UsageError(f"no host named '{name}' in {hosts}", hint="see the names with: cat " + str(hosts))
        offer = fetch_host_key(matches[0])  # HostError if another key is on file or this one is revoked
        key, where = describe_key(offer.key), f"{offer.target.hostname}:{offer.target.port}"
        if offer.known:
            out.print(f"{name} ({where}) is already trusted: {key}", markup=False)
            return
        out.print(f"{name} ({where}) offers the host key {key}\n  compare it on that machine: ssh-keygen -lf "
                  f"/etc/ssh/ssh_host_{offer.key.algorithm_name.lower()}_key.pub", markup=False)
        if not yes:
            if not sys.stdin.isatty():  # a pipe or /dev/null: nobody can answer, and a script must not hang
                raise UsageError(f"not trusting {name}: stdin is not a terminal, so macrun cannot ask you",
                                 hint=f"run it in a terminal, or add --yes once the fingerprint above matches "
                                      f"the host's: macrun hosts trust {name} --yes")
            if not typer.confirm(f"Trust {name}'s key?", default=False):
                err.print(f"not trusted: {name} (nothing was added)", markup=False)
                raise typer.Exit(1)
        offer.trust()
        out.print(f"trusted {name}: {key} (added to {offer.target.known_hosts_files[0]})", markup=False)


@hosts_app.command("setup-thunderbolt")
def hosts_setup_thunderbolt(
    hosts: Annotated[Path, typer.Option("--hosts", help="The hosts file; --apply writes the cable addresses "
                                        "into it (fast_ips) with a record for --undo.")] = Path("hosts.json"),
    apply: Annotated[bool, typer.Option("--apply", help="Make the changes over SSH (sudo asks for a password "
                                        "once, unless the user is root or has passwordless sudo).")] = False,
    undo: Annotated[bool, typer.Option("--undo", help="Remove exactly what --apply added and bring back the "
                                       "Thunderbolt Bridge it took down.")] = False,
    print_: Annotated[bool, typer.Option("--print", help="Print the commands to run by hand on each host; "
                                         "change nothing.")] = False,
    accept_new_host_keys: TrustOpt = False,
) -> None:
    """Give each Thunderbolt cable between the hosts its own /30, so the ring (and RDMA) runs over the cables.

    Shows the cable map (which host's port leads to which) and the addresses; --apply sets them, --undo restores. Nothing survives a reboot: run --apply again after one.
    """
    with user_errors():
        if apply and undo:
            raise UsageError("--apply and --undo do opposite things", hint="pick one of them")
        from launcher.thunderbolt.tbsetup import setup_thunderbolt
        from launcher.transport.ssh import connect_all

        specs = _load_hosts(hosts)
        conns = connect_all(specs, accept_new_host_key=accept_new_host_keys)
        try:
            setup_thunderbolt(hosts, specs, conns, mode="undo" if undo else "apply" if apply else "show",
                              print_only=print_, emit=_emit, ask_password=_ask_sudo_password)
        finally:
            for conn in conns:
                conn.close()


def _ask_sudo_password(hosts: list[str]) -> str:
    """The sudo password, asked once on the terminal (never echoed, stored or logged)."""
    if not sys.stdin.isatty():
        raise UsageError(f"sudo on {', '.join(hosts)} needs a password, and stdin is not a terminal to ask it on",
                         hint="run it in a terminal, or use --print and run the commands on each host yourself")
    import getpass

    return getpass.getpass(f"sudo password for {', '.join(hosts)} (asked once, used for this command only): ")


@config_app.command("show")
def config_show(
    config: Annotated[Path, typer.Argument(help="A YAML config.")],
    set_: SetOpt = None,
) -> None:
    """Print a config with every default and override applied."""
    with user_errors():
        import yaml

        from distributed.config import load_config

        out.print(yaml.safe_dump(load_config(config, set_ or []).to_dict(), sort_keys=False), markup=False)


@config_app.command("keys")
def config_keys() -> None:
    """List every config key with its default and what it does."""
    from rich.table import Table

    from distributed.config import describe_keys

    table = Table("key", "default", "meaning", box=None)
    for key, help_text, default in describe_keys():
        table.add_row(key, repr(default) if not callable(default) else "", help_text)
    out.print(table)


@app.command(context_settings={"allow_extra_args": False})
def benchmark(
    type_: Annotated[str, typer.Option("--type", "-t", help="allreduce: all_sum time, algbw and busbw per size, every result checked, against the ring links' TCP throughput · bandwidth: TCP throughput and RTT between every pair of hosts over every link they share · latency: small all_sum and neighbour ping-pong.")] = "allreduce",
    hosts: HostsOpt = None,
    nproc: Annotated[int, typer.Option("--nproc", "-n", min=1, help="Local ranks when there is no --hosts.")] = 2,
    link: LinkOpt = "auto",
    backend: BackendOpt = None,
    sizes: Annotated[str | None, typer.Option("--sizes", help="Bytes per all_sum, K/M/G = 1024, 1024², 1024³ (default 1K,1M,16M,256M; latency: 4,64,512,4K).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16.")] = "float32",
    iters: Annotated[int, typer.Option("--iters", min=1, help="Timed iterations per size, at most: fewer (not under 3) when a size would take longer than --budget.")] = 20,
    warmup: Annotated[int, typer.Option("--warmup", min=1, help="Untimed iterations before them.")] = 2,
    budget: Annotated[float, typer.Option("--budget", min=0.1, help="Seconds per size that decide the iterations.")] = 10.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every figure, with hosts, versions and commit, to this file.")] = None,
    compare: Annotated[Path | None, typer.Option("--compare", help="An earlier run's --json file: show the change per size.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG of busbw against size (with --compare's run beside it).")] = None,
    accept_new_host_keys: TrustOpt = False,
) -> None:
    """Measure what the links and the collectives really deliver, on the ranks and links a training run would use.

    Examples: macrun benchmark --nproc 2 --sizes 1K,1M,16M · macrun benchmark --hosts hosts.json --link network --json wifi.json · macrun benchmark --hosts hosts.json --compare wifi.json --plot busbw.png · macrun benchmark --hosts hosts.json --type bandwidth
    """
    with user_errors():
        from launcher.benchmark import benchmark_command, plan_benchmark

        spec = plan_benchmark(type_, sizes, dtype=dtype, iters=iters, warmup=warmup, budget_s=budget,
                              hosts=_load_hosts(hosts), nproc=nproc, link=_check_link(link),
                              backend=_check_backend(backend or "auto"), accept_new_host_keys=accept_new_host_keys)
        result = benchmark_command(out, spec, json_path=json_out, compare=compare, plot=plot)
    _finish(result)


def _check_package_clash() -> None:
    import distributed

    if getattr(distributed, "MACRUN_MARKER", None) != "macrun":
        err.print(f"error: the module 'distributed' is not macrun's (found {distributed.__file__})")
        err.print("hint: another package (probably Dask's 'distributed') shadows it; install macrun in its "
                  "own virtual environment: python3 -m venv .venv && .venv/bin/pip install -e .")
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs the app and ends the process with its exit code."""
    _check_package_clash()
    # Rank output must reach a pipe or a log file line by line, not in 8 KiB blocks.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    code: int = 0
    try:
        app(args=argv if argv is not None else sys.argv[1:], prog_name="macrun")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            err.print(exc.code, markup=False)
    # Everything is done and flushed here; skipping interpreter teardown (modules, daemon threads of
    # paramiko and rich) saves 0.1-0.4 s per command, measured in benchmarks/launch.py.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
