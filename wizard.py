#!/usr/bin/env python3
"""`python wizard.py`: pick machines and a model, see what will happen, launch.

The front door for someone with a few Macs and no patience for config files. It finds machines (hosts.json
and mDNS), checks them over SSH, offers the configs in configs/ with what each costs, shows the plan, and
only after "launch" writes hosts.json (merged, never dropping an entry) and a run config, then trains
through the same launcher API as `macrun train`. Ctrl-C at any question exits (130) with nothing written.

    python wizard.py
    python wizard.py --yes --select studio,mbp --model quickstart --set train.steps=200     # no questions

The flow lives here; the logic in launcher/room/discovery.py, launcher/room/hostcheck.py and launcher/views/plan.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from distributed.config import load_config
from distributed.errors import ConfigError, HostError, HostsError, MacrunError
from launcher.jobs.api import SOURCE_ROOT
from launcher.room.discovery import (
    SOURCE_BOTH,
    SOURCE_FILE,
    Candidate,
    browse,
    candidate_from_address,
    interfaces_from_env,
    merge_hosts,
    template_from_file,
)
from launcher.room.hostcheck import CheckState, HostCheck, check_machines, judge, render_checks
from launcher.room.hosts import HostSpec, load_hosts, save_hosts
from launcher.room.preflight import HostFacts, raise_for_problems
from launcher.views.asker import Asker
from launcher.views.plan import (
    FINETUNE_CONFIG,
    Machine,
    ModelChoice,
    WizardPlan,
    default_model,
    find_config_dir,
    fit_problem,
    format_bytes,
    format_count,
    launch_order,
    list_models,
    load_model_choice,
    pick_run_name,
    plan_islands_for,
    plan_links,
    plan_rows,
    run_config_text,
    write_atomic,
)
from launcher.views.wizard_finetune import choose_finetune, local_models, too_big
from launcher.views.wizard_view import candidate_title, candidates_table, model_title, shown_path

EXIT_CANCELLED = 130
ADD = "\0add"  # the checkbox value of "add a machine by address"
NO_MACHINES = (
    "No machines found.\n\n"
    "On each Mac, turn on Remote Login: System Settings → General → Sharing → Remote Login "
    "(then it announces itself on the network), and run the wizard again.\n"
    "Or write hosts.json (copy hosts.example.json), or add a machine by its address now."
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python wizard.py", description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=Path, default=Path("hosts.json"), help="hosts file to read and merge into")
    p.add_argument("--select", help="machines to use, by name or address, comma-separated (skips the question)")
    p.add_argument("--model", help="config name in configs/ (e.g. quickstart) or a YAML path (skips the question)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--python", help="Python with MLX on machines found by mDNS or added by address")
    p.add_argument("--link", choices=("auto", "thunderbolt", "network"), default="auto",
                   help="where the ring runs: auto (Thunderbolt when every neighbour pair is cabled), or force one")
    p.add_argument("--no-mdns", action="store_true", help="do not look for machines on the network")
    p.add_argument("--mdns-timeout", type=float, default=3.0, metavar="SECONDS", help="how long to listen")
    p.add_argument("--accept-new-host-keys", action="store_true", help="trust machines whose SSH key is new")
    p.add_argument("--dry-run", action="store_true", help="show the plan, write nothing, launch nothing")
    p.add_argument("--yes", "-y", action="store_true", help="answer every question with its default")
    return p.parse_args(argv)


class Wizard:
    """The five steps; each prints what it learned."""

    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.out = console
        self.ask = Asker(console, args.yes)
        self.cwd = Path.cwd()
        self.written: list[Path] = []
        self.file_hosts: list[HostSpec] = []
        self.template: HostSpec | None = None
        self.trusted: list[str] = []  # hosts whose key the user accepted (known_hosts was appended to)

    # ---- 1. find machines -------------------------------------------------------------------------------
    def find_machines(self) -> list[Candidate]:
        path: Path = self.args.hosts
        template: HostSpec | None = None
        if path.exists():
            self.file_hosts = load_hosts(path, check_files=False)
            template = template_from_file(path)
            self.out.print(f"{path}: {len(self.file_hosts)} machine(s)")
        else:
            self.out.print(f"{path}: not there yet (it is written when you launch)")
        if self.args.python:
            template = replace(template or HostSpec(name="-", hostname="-"), python=self.args.python)
        found = []
        if not self.args.no_mdns:
            interfaces = interfaces_from_env()
            where = f" on {', '.join(interfaces)}" if interfaces else ""
            with self.out.status(f"Looking for Macs on the network{where} (mDNS, {self.args.mdns_timeout:g} s)…"):
                try:
                    found = browse(self.args.mdns_timeout, interfaces)
                except HostError as exc:
                    self.out.print(f"[yellow]mDNS:[/] {escape(exc.message)}")
            self.out.print(f"mDNS: {len(found)} machine(s) with Remote Login on")
        self.template = template
        candidates = merge_hosts(self.file_hosts, found, template=template)
        if candidates:
            self.out.print(candidates_table(candidates))
        return candidates

    def choose_machines(self, candidates: list[Candidate]) -> list[Candidate]:
        if self.args.select:
            return self._select_by_flag(candidates, self.args.select)
        if not candidates:
            self.out.print(Panel(NO_MACHINES, title="no machines", border_style="yellow"))
            added = self._add_by_address(blank="blank: quit")
            if added is None:
                raise HostsError("no machines to train on",
                                 hint="turn on Remote Login on your Macs, or write hosts.json (see hosts.example.json)")
            return [added]
        import questionary

        from_file = [c.name for c in candidates if c.source in (SOURCE_FILE, SOURCE_BOTH)]
        ticked = from_file or [c.name for c in candidates]
        choices = [questionary.Choice(candidate_title(c), value=c.name, checked=c.name in ticked)
                   for c in candidates]
        choices += [questionary.Separator(), questionary.Choice("add a machine by address…", value=ADD)]
        picked = self.ask.checkbox("Which machines should train?", choices, ticked)
        chosen = [c for c in candidates if c.name in picked]
        if ADD in picked:
            added = self._add_by_address(blank="blank: none")
            if added is not None:
                chosen.append(added)
        if not chosen:
            raise HostsError("no machines selected", hint="tick at least one machine")
        return chosen

    def _select_by_flag(self, candidates: list[Candidate], text: str) -> list[Candidate]:
        chosen: list[Candidate] = []
        for token in (t.strip() for t in text.split(",") if t.strip()):
            match = next((c for c in candidates if token.lower() in (c.name.lower(), c.address.lower())), None)
            if match is None and ("." in token or "@" in token or ":" in token):
                match = candidate_from_address(token, self.template)
            if match is None:
                names = ", ".join(c.name for c in candidates) or "none found"
                raise HostsError(f"--select: no machine called {token!r}", hint=f"machines found: {names}")
            if match not in chosen:
                chosen.append(match)
        self.out.print(f"selected: {', '.join(c.name for c in chosen)}")
        return chosen

    def _add_by_address(self, *, blank: str) -> Candidate | None:
        while True:
            text = self.ask.text(f"Address of a Mac to add (name, IP, user@host or host:port; {blank})")
            if not text:
                return None
            try:
                return candidate_from_address(text, self.template)
            except HostsError as exc:
                self.out.print(f"[red]{escape(exc.message)}[/]" + (f" — {escape(exc.hint)}" if exc.hint else ""))
                if self.ask.assume_yes:
                    raise

    # ---- 2. check them -------------------------------------------------------------------------------------
    def check(self, chosen: list[Candidate]) -> tuple[list[HostSpec], dict[str, HostFacts]]:
        specs = {c.name: c.spec for c in chosen}
        checks = self._check(list(specs.values()))
        for name in [n for n, c in checks.items() if c.state is CheckState.UNKNOWN_KEY]:
            if self._trust(specs[name], checks[name]):
                checks.update(self._check([specs[name]]))
        answered: set[str] = set()
        while waiting := [n for n, c in checks.items() if c.state is CheckState.NOT_READY]:
            default = self.args.python if self.args.python and self.args.python not in answered else ""
            python = self.ask.text(f"Which Python has MLX on {', '.join(waiting)}? (a path on those Macs, e.g. "
                                   f"/opt/homebrew/bin/python3 or ~/venv/bin/python; blank: leave them out)", default)
            if not python:
                break
            answered.add(python)
            for name in waiting:
                specs[name] = replace(specs[name], python=python)
            checks.update(self._check([specs[n] for n in waiting]))
        usable = {n: c for n, c in checks.items() if c.usable}
        left_out = [c for c in checks.values() if not c.usable]
        if left_out:
            self.out.print("[yellow]left out:[/] " + ", ".join(f"{escape(c.name)} ({c.state.value})" for c in left_out))
        if not usable:
            raise HostError("none of the selected machines can take part",
                            hint=next((c.hint for c in left_out if c.hint), None) or "see the reasons above")
        facts = {n: c.facts for n, c in usable.items() if c.facts is not None}
        _, group = judge(facts)
        raise_for_problems(group)
        return [specs[n] for n in usable], facts

    def _check(self, specs: list[HostSpec]) -> dict[str, HostCheck]:
        with self.out.status(f"Connecting to {len(specs)} machine(s)…"):
            checks, _ = check_machines(specs)
        self.out.print(render_checks(checks))
        for c in checks.values():
            if not c.usable and c.state is not CheckState.UNKNOWN_KEY:  # _trust explains that one
                self.out.print(f"  [red]✗[/] {escape(c.name)}: {escape(c.reason)}")
                if c.hint:
                    self.out.print(f"    hint: {escape(c.hint)}")
            for w in c.warnings:
                self.out.print(f"  [yellow]![/] {escape(w)}")
        return checks

    def _trust(self, spec: HostSpec, check: HostCheck) -> bool:
        from launcher.transport.ssh import fetch_host_key, key_fingerprint

        kind = (check.fingerprint or "ed25519 ").split()[0].lower()
        self.out.print(f"{escape(spec.name)} ({escape(spec.hostname)}) offers an SSH host key this machine has not "
                       f"seen: [bold]{escape(check.fingerprint or '?')}[/]\n  compare it on that Mac: "
                       f"ssh-keygen -lf /etc/ssh/ssh_host_{escape(kind)}_key.pub")
        if not self.ask.confirm(f"Trust {spec.name}'s key?", default=False,
                                yes_answer=self.args.accept_new_host_keys):
            return False
        offer = fetch_host_key(spec)
        fingerprint = key_fingerprint(offer.key)
        if check.fingerprint and not check.fingerprint.endswith(fingerprint):
            raise HostError(f"{spec.name} offered another key on the second connection ({fingerprint})",
                            hint="someone may be intercepting the connection; check the network")
        offer.trust()  # only the key that was shown and accepted
        self.out.print(f"trusted {escape(spec.name)}: {fingerprint} (added to ~/.ssh/known_hosts)")
        self.trusted.append(spec.name)
        return True

    # ---- 3. pick a model -------------------------------------------------------------------------------------
    def choose_model(self, hosts: list[HostSpec], facts: dict[str, HostFacts]) -> tuple[ModelChoice, str | None]:
        import questionary

        machines = [Machine(h.name, facts[h.name].memory_bytes, h.slots) for h in hosts if h.name in facts]
        config_dir = find_config_dir(self.cwd, SOURCE_ROOT)
        if self.args.model:
            choice = self._model_by_flag(config_dir, self.args.model)
            problem = fit_problem(choice.memory_per_rank, machines)
            self.out.print(f"model: {choice.name} ({format_count(choice.params)} parameters, about "
                           f"{format_bytes(choice.memory_per_rank)} per rank)")
            if problem:
                self.out.print(f"[yellow]warning:[/] {escape(choice.name)} {escape(problem)}")
            return choice, problem
        choices = list_models(config_dir, self.args.overrides)
        default = default_model(choices)
        if default is None:
            raise ConfigError(f"no config in {config_dir} can be loaded",
                              hint=next((c.error for c in choices if c.error), "add a YAML config there"))
        smallest = min(machines, key=lambda m: m.memory_bytes, default=None)
        where = shown_path(config_dir, self.cwd)
        if smallest is not None:
            self.out.print(f"models in {where} (the smallest Mac, {smallest.name}, has "
                           f"{format_bytes(smallest.memory_bytes)}):")
        local = local_models(self.out, self.cwd, config_dir, self.args.overrides)
        if local:  # the mlx-lm configs are templates for these models: the models found take their place
            choices = [c for c in choices if c.config is None or c.config.model.source == "builtin"]
        fits = {c.name: fit_problem(c.memory_per_rank, machines) for c in choices}
        if self.args.overrides:
            self.out.print(f"sizes include your --set {' '.join(self.args.overrides)}")
        width = min(48, max(len(c.name) for c in [*choices, *local]))
        items = [questionary.Choice(model_title(c, fits.get(c.name), width), value=c.name,
                                    disabled=c.error) for c in choices]
        if local:
            items.append(questionary.Separator(f"── mlx-lm models on this Mac, fine-tuned with {FINETUNE_CONFIG} "
                                               "(sizes for its LoRA) ──"))
            items += [questionary.Choice(model_title(c, None, width), value=c.name,
                                         disabled=c.error or too_big(c, machines)) for c in local]
        while True:
            default_item = next(i for i in items if i.value == default.name)
            name = self.ask.select("Which model?", items, default_item)
            found = next((c for c in local if c.name == name), None)
            if found is not None:
                return choose_finetune(self.ask, self.out, self.cwd, self.args.overrides, found, machines), None
            choice = next(c for c in choices if c.name == name)
            if not fits[name]:
                return choice, None
            self.out.print(f"[yellow]warning:[/] {escape(name)} {escape(fits[name] or '')}")
            if self.ask.confirm(f"Use {name} anyway?", default=False, yes_answer=True):
                return choice, fits[name]

    def _model_by_flag(self, config_dir: Path, text: str) -> ModelChoice:
        path = Path(text)
        if not (path.suffix in (".yaml", ".yml") and path.is_file()):
            path = config_dir / f"{text}.yaml"
        if not path.is_file():
            names = ", ".join(sorted(p.stem for p in config_dir.glob("*.yaml")))
            raise ConfigError(f"--model: no config {text!r} in {config_dir}", hint=f"choose one of: {names}")
        choice = load_model_choice(path, self.args.overrides)
        if choice.error:
            raise ConfigError(choice.error)
        return choice

    # ---- 4. the plan, 5. launch -------------------------------------------------------------------------
    def make_plan(self, hosts: list[HostSpec], facts: dict[str, HostFacts], choice: ModelChoice,
                  problem: str | None) -> WizardPlan:
        assert choice.config is not None
        base = choice.config.run
        output_dir = Path(base.output_dir)
        name = pick_run_name(base.name, output_dir)
        overrides = (*self.args.overrides, *choice.sets) + ((f"run.name={name}",) if name != base.name else ())
        config = load_config(choice.path, overrides)
        existing = [h.name for h in self.file_hosts]
        selected = {h.name.lower() for h in hosts}
        kept = [n for n in existing if n.lower() not in selected]
        warnings = [f"{choice.name} {problem}"] if problem else []
        ordered = launch_order(existing, hosts)
        ring = plan_links(ordered, facts, self.args.link)
        return WizardPlan(hosts=ordered, ring=ring, islands=plan_islands_for(ordered, facts, self.args.link, ring),
                          model=choice, config=config,
                          source_config=choice.path, overrides=overrides, hosts_file=self.args.hosts,
                          run_config=output_dir / f"{name}.yaml",
                          run_hosts_file=output_dir / f"{name}.hosts.json" if kept else None,
                          kept_entries=len(kept), link_mode=self.args.link, warnings=warnings,
                          push_model=choice.local is not None)

    def show_plan(self, plan: WizardPlan) -> None:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        for label, text in plan_rows(plan, self.cwd):
            grid.add_row(f"[yellow]{label}[/]" if label == "warning" else label, escape(text))
        self.out.print(Panel(grid, title="the plan", title_align="left"))

    def launch(self, plan: WizardPlan) -> int:
        from launcher.jobs.job import render_failure_table
        from launcher.jobs.training import train_job

        save_hosts(plan.hosts_file, plan.hosts)
        self.written.append(plan.hosts_file)
        if plan.run_hosts_file:
            save_hosts(plan.run_hosts_file, plan.hosts)
            self.written.append(plan.run_hosts_file)
        write_atomic(plan.run_config, run_config_text(plan, self.cwd))
        self.written.append(plan.run_config)
        self.out.print("wrote " + ", ".join(str(p) for p in self.written))
        self.out.print(f"the same launch again, without the wizard:\n  [bold]{escape(plan.command(self.cwd))}[/]")
        hosts = load_hosts(plan.launch_hosts_file, check_files=False)
        result = train_job(plan.run_config, [], hosts=hosts, link=plan.link_mode, push_model=plan.push_model,
                           emit=lambda line: self.out.print(line, markup=False),
                           resume_command=f"{plan.command(self.cwd)} --resume")
        if result.exit_code != 0:
            self.out.print(render_failure_table(result))
            return result.exit_code
        ckpts = Path(plan.config.run.output_dir) / plan.config.run.name / "checkpoints"
        self.out.print(f"[green]done[/]: checkpoints in {ckpts}")
        return 0

    def run(self) -> int:
        self.out.rule("1 · machines")
        chosen = self.choose_machines(self.find_machines())
        self.out.rule("2 · check")
        hosts, facts = self.check(chosen)
        self.out.rule("3 · model")
        choice, problem = self.choose_model(hosts, facts)
        self.out.rule("4 · plan")
        plan = self.make_plan(hosts, facts, choice, problem)
        self.show_plan(plan)
        if self.args.dry_run:
            self.out.print("dry run: nothing written, nothing launched")
            return 0
        if not self.ask.confirm("Launch now?", default=True):
            self.out.print("not launched; nothing was written")
            return 0
        self.out.rule("5 · launch")
        return self.launch(plan)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the wizard; the exit code is the run's (0 ok), 130 when cancelled, a MacrunError's otherwise."""
    args = parse_args(argv)
    console = Console(highlight=False)
    wizard = Wizard(args, console)
    try:
        return wizard.run()
    except KeyboardInterrupt:
        if wizard.written:
            console.print("\ninterrupted; already written: " + ", ".join(map(str, wizard.written)))
        else:
            kept = f" (the key you trusted for {', '.join(wizard.trusted)} stays in ~/.ssh/known_hosts)"
            console.print("\ncancelled: nothing was written" + (kept if wizard.trusted else ""))
        return EXIT_CANCELLED
    except MacrunError as exc:
        if os.environ.get("MACRUN_DEBUG"):
            raise
        err = Console(stderr=True, highlight=False)
        err.print(f"[bold red]error:[/] {escape(exc.message)}")
        if exc.hint:
            err.print(f"[bold]hint:[/] {escape(exc.hint)}")
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
