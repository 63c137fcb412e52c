"""Unit tests for the wizard's pure logic: launcher/views/plan.py, launcher/room/hostcheck.py, wizard.py's helpers."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import paramiko
import pytest

import wizard
from distributed.config import ModelConfig, load_config
from distributed.errors import ConfigError, HostError, HostsError
from distributed.links import Link
from distributed.topology import RingHost, plan_ring
from distributed.topology_islands import plan_islands
from launcher.room.discovery import Candidate, candidate_from_address, template_from_file
from launcher.room.hostcheck import CheckState, judge, render_checks, unknown_key_fingerprint
from launcher.room.hosts import HostSpec, load_hosts
from launcher.room.preflight import GIB, HostFacts, InterfaceFacts
from launcher.transport import ssh
from launcher.views.plan import (
    Machine,
    WizardPlan,
    default_model,
    describe_config,
    describe_links,
    describe_strategy,
    describe_traffic,
    find_config_dir,
    fit_problem,
    format_bytes,
    format_count,
    launch_order,
    list_models,
    load_model_choice,
    param_count,
    pick_run_name,
    plan_links,
    plan_rows,
    run_config_text,
    write_atomic,
)
from tests.support.tinyhf import put_in_hf_cache, tiny_models, write_dataset

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def facts(name: str, *, memory_gib: int = 16, tb: tuple[str, ...] = (), **changes: object) -> HostFacts:
    """A probed Mac; `tb` gives Thunderbolt addresses ("10.0.1.1/30"), one interface each."""
    interfaces = (InterfaceFacts("lo0", "loopback", ("127.0.0.1/8",)),
                  InterfaceFacts("en0", "wifi", (f"192.168.1.{10 + len(name)}/24",)),
                  *(InterfaceFacts(f"bridge{i}", "thunderbolt", (cidr,)) for i, cidr in enumerate(tb)))
    base = HostFacts(name=name, hostname=f"{name}.local", python_version="3.12.4",
                     python_executable="/opt/homebrew/bin/python3", os_name="Darwin", os_version="15.1",
                     machine="arm64", chip="Apple M3", memory_bytes=memory_gib * GIB, cpu_count=8,
                     disk_path="/Users/ada", disk_free_bytes=200 * GIB, battery_percent=None, on_ac=None,
                     mlx_version="0.25.2", mlx_error=None, mlx_device="Device(gpu, 0)", interfaces=interfaces,
                     probe_seconds=0.1)
    return replace(base, **changes)  # type: ignore[arg-type]


# ---- models on offer ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("# A small model.\n# More.\nrun:\n  name: x\n", "A small model."),
    ("#\n#   Indented title  \nrun: {}\n", "Indented title"),
    ("\n\n# After blank lines\n", "After blank lines"),
    ("run:\n  name: x  # not a header\n", ""),
    ("", ""),
])
def test_describe_config_is_the_first_comment_line(text: str, expected: str) -> None:
    assert describe_config(text) == expected


def test_every_shipped_config_is_offered_with_a_description_and_size() -> None:
    choices = list_models(CONFIGS)
    assert {c.name for c in choices} == {p.stem for p in CONFIGS.glob("*.yaml")}
    # mlx-lm fine-tunes are listed, last and not selectable, with the command that runs them.
    finetunes = [c for c in choices if c.config is not None and c.config.model.source == "mlx-lm"]
    assert {c.name for c in finetunes} == {"lora-chat", "full-small"} and choices[-len(finetunes):] == finetunes
    assert all("macrun train configs/" in (c.error or "") for c in finetunes)
    choices = [c for c in choices if c not in finetunes]
    for c in choices:
        assert c.error is None and c.config is not None, c.error
        assert c.description and not c.description.startswith("#")
        assert c.params > 0 and c.memory_per_rank > 0
    assert [c.params for c in choices] == sorted(c.params for c in choices)  # smallest first
    default = default_model(choices)
    assert default is not None and default.name == "quickstart"


@pytest.mark.parametrize("size", ["tiny", "mini"])
def test_param_count_matches_the_built_model(size: str) -> None:
    from distributed.models.gpt import build_model, count_params

    cfg = ModelConfig(size=size)
    assert param_count(cfg, 32) == count_params(build_model(cfg, block_size=32, seed=0))


def test_overrides_change_the_cost_and_bad_files_are_reported(tmp_path: Path) -> None:
    base = load_model_choice(CONFIGS / "quickstart.yaml")
    tiny = load_model_choice(CONFIGS / "quickstart.yaml", ["model.size=tiny", "data.seq_len=32"])
    assert tiny.params < base.params and tiny.memory_per_rank < base.memory_per_rank
    (tmp_path / "broken.yaml").write_text("# Broken.\nrun: [\n")
    (tmp_path / "typo.yaml").write_text("# Typo.\ntrain:\n  stepz: 3\n")
    (tmp_path / "ok.yaml").write_text("# Fine.\nmodel:\n  size: tiny\n")
    choices = list_models(tmp_path)
    assert [c.name for c in choices] == ["ok", "broken", "typo"]  # those that fail to load come last
    assert "not valid YAML" in (choices[1].error or "") and "train.stepz" in (choices[2].error or "")
    assert default_model(choices) == choices[0]
    assert default_model(choices[1:]) is None


def test_find_config_dir_prefers_the_current_folder(tmp_path: Path) -> None:
    assert find_config_dir(tmp_path, REPO) == REPO / "configs"
    (tmp_path / "configs").mkdir()
    assert find_config_dir(tmp_path, REPO) == tmp_path / "configs"


# ---- memory fit ---------------------------------------------------------------------------------------------
def test_fit_problem_names_the_tightest_mac() -> None:
    macs = [Machine("studio", 64 * GIB), Machine("air", 8 * GIB)]
    assert fit_problem(5 * GIB, macs) is None  # 5 <= 0.75 * 8
    problem = fit_problem(7 * GIB, macs)
    assert problem is not None and problem.startswith("needs about 7.0 GiB per Mac, but air has 8.0 GiB")
    assert "about 6.0 GiB usable by MLX" in problem and "batch_size" in problem
    assert fit_problem(7 * GIB, []) is None and fit_problem(0, macs) is None


def test_fit_problem_counts_every_rank_on_a_mac() -> None:
    # 2 ranks on a 16 GiB Mac leave 8 GiB each: tighter than a 12 GiB Mac with one rank.
    macs = [Machine("mini", 12 * GIB), Machine("pro", 16 * GIB, slots=2)]
    problem = fit_problem(7 * GIB, macs)
    assert problem is not None and "needs about 14 GiB per Mac (2 ranks), but pro has 16 GiB" in problem


def test_a_huge_batch_does_not_fit_a_laptop() -> None:
    choice = load_model_choice(CONFIGS / "gpt2-small.yaml", ["train.batch_size=512"])
    assert fit_problem(choice.memory_per_rank, [Machine("air", 16 * GIB)]) is not None
    small = load_model_choice(CONFIGS / "quickstart.yaml")
    assert fit_problem(small.memory_per_rank, [Machine("air", 8 * GIB)]) is None


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (1536, "1.5 KiB"), (125 * 2**20, "125 MiB"),
                                         (int(24.4 * GIB), "24 GiB"), (3 * 2**40, "3.0 TiB")])
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_format_count() -> None:
    assert (format_count(123_456), format_count(85_100_000), format_count(1_300_000_000)) == ("0.12M", "85.1M",
                                                                                               "1.3B")


# ---- links and strategy -------------------------------------------------------------------------------------
def hosts(*names: str) -> list[HostSpec]:
    return [HostSpec(name=n, hostname=f"192.168.1.{10 + i}") for i, n in enumerate(names)]


def test_links_over_a_thunderbolt_cable_and_ddp() -> None:
    f = {"a": facts("a", tb=("10.0.1.1/30",)), "b": facts("b", tb=("10.0.1.2/30",))}
    ring = plan_links(hosts("a", "b"), f)
    assert ring.link == "thunderbolt"
    assert describe_links(ring).startswith("ring over Thunderbolt: a 10.0.1.1 → b 10.0.1.2 → a (every pair")
    cfg = load_config(CONFIGS / "quickstart.yaml")
    mode, why = describe_strategy(cfg, 2, ring.link)
    assert mode == "ddp" and why.startswith("auto: decided when the ranks start, from the measured link speed")
    assert "over thunderbolt a per-step allreduce" in why


def test_links_without_a_cable_go_over_the_network_with_diloco() -> None:
    f = {"a": facts("a", tb=("10.0.1.1/30",)), "b": facts("b")}
    ring = plan_links(hosts("a", "b"), f)
    assert ring.link == "network"
    assert "b has no Thunderbolt link" in describe_links(ring) and "192.168.1.10" in describe_links(ring)
    cfg = load_config(CONFIGS / "quickstart.yaml")
    name, why = describe_strategy(cfg, 2, ring.link)
    assert name == "diloco" and f"every {cfg.strategy.inner_steps} steps" in why
    with pytest.raises(HostError, match="cannot run the ring over Thunderbolt"):
        plan_links(hosts("a", "b"), f, "thunderbolt")


def test_fast_ips_count_as_thunderbolt_like_the_launch() -> None:
    f = {"a": facts("a", tb=()), "b": facts("b")}
    f = {n: replace(x, interfaces=(*x.interfaces, InterfaceFacts("en5", "ethernet", (f"10.9.0.{i + 1}/30",))))
         for i, (n, x) in enumerate(f.items())}
    specs = [replace(h, fast_ips=(f"10.9.0.{i + 1}",)) for i, h in enumerate(hosts("a", "b"))]
    assert plan_links(specs, f).link == "thunderbolt"


def test_one_rank_needs_no_links_and_modes_are_honoured() -> None:
    ring = plan_links(hosts("a"), {"a": facts("a")})
    assert describe_links(ring) == "none needed (one rank)"
    cfg = load_config(CONFIGS / "quickstart.yaml")
    assert describe_strategy(cfg, 1, "local")[0] == "local"
    assert describe_strategy(load_config(None, ["strategy.mode=ddp"]), 3, "network")[0] == "ddp"
    assert describe_strategy(load_config(None, ["strategy.mode=diloco"]), 3, "thunderbolt")[0] == "diloco"


# ---- the plan -------------------------------------------------------------------------------------------------
def test_pick_run_name_never_reuses_an_earlier_run(tmp_path: Path) -> None:
    assert pick_run_name("quickstart", tmp_path) == "quickstart"
    (tmp_path / "quickstart").mkdir()
    (tmp_path / "quickstart-2.yaml").write_text("")
    (tmp_path / "quickstart-3.hosts.json").write_text("")
    assert pick_run_name("quickstart", tmp_path) == "quickstart-4"


def test_launch_order_follows_the_merged_file() -> None:
    selected = hosts("new1", "b", "new2", "a")
    ordered = launch_order(["a", "x", "B"], selected)
    assert [h.name for h in ordered] == ["a", "b", "new1", "new2"]


def make_plan(tmp_path: Path, *, kept: int = 0, warnings: tuple[str, ...] = ()) -> WizardPlan:
    choice = load_model_choice(CONFIGS / "quickstart.yaml", ["model.size=tiny", "train.steps=20"])
    overrides = ("model.size=tiny", "train.steps=20", "run.name=quickstart-2")
    cfg = load_config(CONFIGS / "quickstart.yaml", overrides)
    specs = hosts("a", "b")
    f = {"a": facts("a", tb=("10.0.1.1/30",)), "b": facts("b", tb=("10.0.1.2/30",))}
    return WizardPlan(hosts=specs, ring=plan_links(specs, f), model=choice, config=cfg,
                      source_config=CONFIGS / "quickstart.yaml", overrides=overrides,
                      hosts_file=tmp_path / "hosts.json", run_config=tmp_path / "runs" / "quickstart-2.yaml",
                      run_hosts_file=tmp_path / "runs" / "quickstart-2.hosts.json" if kept else None,
                      kept_entries=kept, warnings=list(warnings))


def test_plan_rows_say_what_will_happen(tmp_path: Path) -> None:
    plan = make_plan(tmp_path)
    rows = dict(plan_rows(plan, tmp_path))
    assert list(rows) == ["machines", "links", "model", "strategy", "traffic", "steps", "data", "checkpoints",
                          "writes", "command"]
    # DDP over 2 ranks: each sends 2(n-1)/n = 1x the float32 gradients per step.
    assert rows["traffic"].startswith("each rank sends ") and "of gradients per step" in rows["traffic"]
    assert rows["machines"] == "a (192.168.1.10), b (192.168.1.11) → 2 ranks; rank 0 on a"
    assert rows["model"].startswith("quickstart: tiny GPT, 0.1")
    assert rows["strategy"].startswith("ddp (auto: decided when the ranks start")
    steps, batch, seq = 20, plan.config.train.batch_size, plan.config.data.seq_len
    assert rows["steps"].startswith(f"20 steps × 2 ranks × {batch} sequences × {seq} tokens = "
                                    f"{steps * 2 * batch * seq:,} tokens")
    assert rows["checkpoints"] == "at the end (step 20), on a, copied back to runs/quickstart-2/checkpoints"
    assert rows["writes"] == "hosts.json (adds/updates 2, keeps 0); runs/quickstart-2.yaml"
    assert rows["command"] == "macrun train --hosts hosts.json runs/quickstart-2.yaml"


def test_plan_with_other_machines_in_the_file_uses_its_own_hosts_file(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, kept=3, warnings=("quickstart needs about 1 TiB",))
    plan = replace(plan, link_mode="network")
    rows = plan_rows(plan, tmp_path)
    assert ("warning", "quickstart needs about 1 TiB") == rows[-1]
    text = dict(rows)
    assert "keeps 3" in text["writes"] and "runs/quickstart-2.hosts.json (just these machines)" in text["writes"]
    assert text["command"] == ("macrun train --hosts runs/quickstart-2.hosts.json --link network "
                               "runs/quickstart-2.yaml")


def test_run_config_reads_back_to_the_same_config(tmp_path: Path) -> None:
    plan = make_plan(tmp_path)
    text = run_config_text(plan, tmp_path)
    assert text.splitlines()[0] == ("# Run quickstart-2: written by wizard.py from "
                                    f"{CONFIGS / 'quickstart.yaml'} --set model.size=tiny --set train.steps=20 "
                                    "--set run.name=quickstart-2")
    assert "#   macrun train --hosts hosts.json runs/quickstart-2.yaml" in text
    write_atomic(plan.run_config, text)
    assert load_config(plan.run_config) == plan.config
    assert [p.name for p in plan.run_config.parent.iterdir()] == ["quickstart-2.yaml"]  # no temp file left


def test_write_atomic_replaces_whole_and_cleans_up_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "a.yaml"
    write_atomic(target, "old\n")
    write_atomic(target, "new\n")
    assert target.read_text() == "new\n"
    with pytest.raises(TypeError):
        write_atomic(target, None)  # type: ignore[arg-type]
    assert target.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["a.yaml"]


# ---- verdicts on machines -------------------------------------------------------------------------------------
def test_unknown_key_fingerprint_reads_the_ssh_modules_own_message(tmp_home: Path) -> None:
    key = paramiko.ECDSAKey.generate()
    host = HostSpec(name="h0", hostname="10.0.0.1")
    with pytest.raises(HostError) as err:
        ssh._check_host_key(key, host, ssh.resolve_target(host), accept_new=False)
    assert unknown_key_fingerprint(err.value) == ssh.describe_key(key)
    assert unknown_key_fingerprint(HostError("cannot reach h0: connection refused")) is None


def test_judge_sorts_hosts_into_ok_not_ready_and_group_problems() -> None:
    f = {"a": facts("a"), "b": facts("b", mlx_version=None, mlx_error="No module named 'mlx'"),
         "c": facts("c", on_ac=False, battery_percent=24), "e": facts("e", on_ac=False, battery_percent=12)}
    checks, group = judge(f)
    assert [checks[n].state for n in "abce"] == [CheckState.OK, CheckState.NOT_READY, CheckState.OK,
                                                 CheckState.NOT_READY]
    assert "MLX does not import on b" in checks["b"].reason and "pip install" in (checks["b"].hint or "")
    assert checks["c"].warnings == ("c is on battery (24%), low",) and checks["c"].usable
    # Below fault.min_battery (20%) the wizard refuses the Mac, as the launch would.
    assert checks["e"].reason == "e is on battery at 12% (below fault.min_battery 20%)" and not checks["e"].usable
    assert group == []
    _, group = judge({"a": facts("a"), "d": facts("d", mlx_version="0.26.0")})
    assert len(group) == 1 and "MLX versions differ" in group[0].message


def test_render_checks_marks_each_state() -> None:
    from rich.console import Console

    checks, _ = judge({"a": facts("a", memory_gib=24, tb=("10.0.1.1/30",))})
    from launcher.room.hostcheck import HostCheck

    checks["ghost"] = HostCheck("ghost", CheckState.UNREACHABLE, reason="connection refused")
    console = Console(width=160, record=True, color_system=None)
    console.print(render_checks(checks))
    text = console.export_text()
    assert "Apple M3" in text and "24 GiB" in text and "bridge0" in text
    assert [line.split("│")[-2].strip() for line in text.splitlines() if line.startswith("│")] == ["ok",
                                                                                                  "unreachable"]


# ---- wizard.py helpers --------------------------------------------------------------------------------------------
def test_parse_args_defaults_and_repeatable_sets() -> None:
    args = wizard.parse_args(["--set", "a.b=1", "-s", "c.d=2", "--select", "x,y"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.select == "x,y" and args.hosts == Path("hosts.json")
    assert (args.yes, args.dry_run, args.no_mdns, args.mdns_timeout, args.link) == (False, False, False, 3.0, "auto")


def test_asker_answers_defaults_under_yes_and_refuses_without_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    console = Console(record=True, width=120)
    yes = wizard.Asker(console, assume_yes=True)
    assert yes.confirm("Trust h0's key?", default=False) is False
    assert yes.confirm("Use it anyway?", default=False, yes_answer=True) is True
    assert yes.text("Which Python?", "/usr/bin/python3") == "/usr/bin/python3"
    assert "? Which Python? /usr/bin/python3 (--yes)" in console.export_text()
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    with pytest.raises(ConfigError, match="no terminal") as err:
        wizard.Asker(console, assume_yes=False).confirm("Launch now?", default=True)
    assert err.value.hint and "--yes" in err.value.hint


def wizard_for(tmp_path: Path, *argv: str) -> wizard.Wizard:
    from rich.console import Console

    args = wizard.parse_args(["--yes", "--hosts", str(tmp_path / "hosts.json"), *argv])
    return wizard.Wizard(args, Console(width=120, record=True))


def test_adding_by_address_parses_user_and_port_and_takes_file_defaults(tmp_path: Path) -> None:
    (tmp_path / "hosts.json").write_text(json.dumps(
        {"defaults": {"python": "/opt/homebrew/bin/python3", "user": "ada"}, "hosts": [{"host": "10.0.0.1"}]}))
    w = wizard_for(tmp_path, "--no-mdns")
    w.find_machines()
    c = candidate_from_address("bob@10.0.0.5:2222", w.template)
    assert (c.name, c.address, c.port, c.source) == ("10.0.0.5", "10.0.0.5", 2222, "added")
    assert (c.spec.user, c.spec.port, c.spec.python) == ("bob", 2222, "/opt/homebrew/bin/python3")
    assert candidate_from_address("studio.local", w.template).spec.user == "ada"
    assert candidate_from_address("studio.local").spec.user is None
    with pytest.raises(HostsError, match="^cannot use 'bad!host': field \"host\" must be a host name or IP"):
        candidate_from_address("bad!host")
    with pytest.raises(HostsError, match="field \"port\" must be an integer from 1 to 65535"):
        candidate_from_address("10.0.0.5:ssh")


def test_select_flag_takes_names_or_addresses_and_rejects_unknown(tmp_path: Path) -> None:
    w = wizard_for(tmp_path, "--no-mdns")
    w.find_machines()
    cands = [Candidate("a", "10.0.0.1", 22, None, "hosts.json", HostSpec("a", "10.0.0.1")),
             Candidate("b", "10.0.0.2", 22, None, "mDNS", HostSpec("b", "10.0.0.2"))]
    assert [c.name for c in w._select_by_flag(cands, "10.0.0.2, A,b")] == ["b", "a"]
    assert w._select_by_flag(cands, "10.0.0.9")[0].source == "added"
    with pytest.raises(HostsError, match="no machine called 'c'") as err:
        w._select_by_flag(cands, "a,c")
    assert err.value.hint == "machines found: a, b"


def test_template_from_file_reads_defaults_only(tmp_path: Path) -> None:
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({"defaults": {"workdir": "~/mr", "slots": 2}, "hosts": [{"host": "x.local"}]}))
    template = template_from_file(path)
    assert template is not None and (template.workdir, template.slots) == ("~/mr", 2)
    assert load_hosts(path)[0].workdir == "~/mr"
    path.write_text(json.dumps([{"ssh": "x.local"}]))  # MLX's format has no defaults
    assert template_from_file(path) is None


def test_view_titles_and_table() -> None:
    from rich.console import Console

    from launcher.views.wizard_view import candidate_title, candidates_table, model_title, shown_path

    c = Candidate("mbp", "10.0.0.2", 2222, "Mac15,3", "both", HostSpec("mbp", "10.0.0.2"), note="mDNS sees it at x")
    assert candidate_title(c).split() == ["mbp", "10.0.0.2:2222", "MacBook", "Pro", "(14-inch,", "M3,", "2023)",
                                          "both", "(mDNS", "sees", "it", "at", "x)"]
    mini = Candidate("mini", "10.0.0.3", 22, "Mac16,10", "mDNS", HostSpec("mini", "10.0.0.3"))
    linux = Candidate("lab-1", "10.0.0.4", 22, "Raspberry Pi 5", "mDNS", HostSpec("lab-1", "10.0.0.4"))
    unknown = Candidate("new", "10.0.0.5", 22, "Mac99,1", "mDNS", HostSpec("new", "10.0.0.5"))
    silent = Candidate("quiet", "10.0.0.6", 22, None, "hosts.json", HostSpec("quiet", "10.0.0.6"))
    assert "Mac mini (M4, 2024)" in candidate_title(mini) and "Mac16,10" not in candidate_title(mini)
    assert "Raspberry Pi 5" in candidate_title(linux) and "Mac99,1" in candidate_title(unknown)
    console = Console(width=120, record=True, color_system=None)
    console.print(candidates_table([c, mini, linux, unknown, silent]))
    text = console.export_text()
    assert "both — mDNS sees it at x" in text
    assert "MacBook Pro (14-inch, M3, 2023) · Mac15,3" in text and "Mac mini (M4, 2024) · Mac16,10" in text
    assert "│ Raspberry Pi 5 " in text and "│ Mac99,1 " in text and "│ -  " in text  # shown as reported
    choice = load_model_choice(CONFIGS / "quickstart.yaml")
    assert model_title(choice, None).startswith("quickstart ") and "⚠" not in model_title(choice, None)
    assert model_title(choice, "needs more").endswith("⚠ may not fit")
    assert shown_path(CONFIGS, REPO) == "configs" and shown_path(CONFIGS, Path("/elsewhere")) == str(CONFIGS)


class ScriptedAsker:
    """The wizard's questions answered from a script of (start of the question, answer), in order; menus kept."""

    assume_yes = False

    def __init__(self, answers: list[tuple[str, Any]]) -> None:
        self.answers = list(answers)
        self.menus: dict[str, list[Any]] = {}

    def _next(self, message: str) -> Any:
        assert self.answers, f"unexpected question: {message}"
        start, answer = self.answers.pop(0)
        assert message.startswith(start), f"asked {message!r}, the script expected {start!r}"
        return answer

    def select(self, message: str, choices: list[Any], default: Any) -> Any:
        answer = self._next(message)
        self.menus[message] = choices
        item = next(c for c in choices if getattr(c, "value", None) == answer)
        assert not item.disabled, f"{answer} is not selectable: {item.disabled}"
        return answer

    def text(self, message: str, default: str = "") -> str:
        return str(self._next(message))

    def confirm(self, message: str, default: bool, yes_answer: bool | None = None) -> bool:
        return bool(self._next(message))


def test_picking_an_mlx_lm_model_plans_a_fine_tune_of_it(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    models = tiny_models(tmp_path_factory.getbasetemp())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    put_in_hf_cache(tmp_path / "hub", "tiny-org/llama-4bit", models["llama-4bit"])
    shutil.copytree(models["llama"], tmp_path / "models" / "llama")
    write_dataset(tmp_path / "chat", "chat")
    monkeypatch.chdir(tmp_path)
    w = wizard_for(tmp_path, "--no-mdns", "--set", "train.steps=30")
    w.ask = ScriptedAsker([("Which model?", "tiny-org/llama-4bit"), ("Data folder", "nope"), ("Data folder", "chat"),
                           ("Fine-tune tiny-org/llama-4bit how?", "lora")])  # type: ignore[assignment]
    specs = hosts("a", "b")
    f = {"a": facts("a", tb=("10.0.1.1/30",)), "b": facts("b", tb=("10.0.1.2/30",))}
    choice, problem = w.choose_model(specs, f)
    assert problem is None and choice.local is not None and choice.estimate is not None
    menu = {getattr(i, "value", None): i for i in w.ask.menus["Which model?"]}
    # The presets as before; the mlx-lm templates give way to the models found, which are listed with their size.
    assert "quickstart" in menu and "lora-chat" not in menu and "full-small" not in menu
    assert not menu["models/llama"].disabled and "f32 · llama · models/" in menu["models/llama"].title
    assert "4-bit, group 32 · llama · HF cache" in menu["tiny-org/llama-4bit"].title
    kinds = {i.value: i for i in w.ask.menus["Fine-tune tiny-org/llama-4bit how?"]}
    assert "quantised" in (kinds["full"].disabled or "") and not kinds["lora"].disabled and not kinds["dora"].disabled
    shown = w.out.export_text()
    assert "mlx-lm models: 2 in " in shown and "nope does not exist" in shown

    plan = w.make_plan(specs, f, choice, problem)
    assert plan.source_config == REPO / "configs" / "lora-chat.yaml" and plan.push_model
    assert plan.overrides == ("train.steps=30", "model.path=tiny-org/llama-4bit", "data.path=chat",
                              "finetune.type=lora", "finetune.layers=-1")
    cfg = plan.config
    assert (cfg.model.path, cfg.data.path, cfg.finetune.type, cfg.train.steps) == ("tiny-org/llama-4bit", "chat",
                                                                                  "lora", 30)
    rows = dict(plan_rows(plan, tmp_path))
    assert rows["model"].startswith("tiny-org/llama-4bit (mlx-lm llama, ") and "4-bit, group 32): LoRA (rank 8) " \
        "on the last 2 layers" in rows["model"]
    # DDP over 2 ranks sends 2(n-1)/n = 1x the adapters' float32 gradients per step: the adapters' bytes.
    per_sync = format_bytes(choice.sync_bytes)
    assert choice.sync_bytes == 4 * choice.estimate.trainable
    assert rows["traffic"].startswith(f"the adapters travel: {format_count(choice.estimate.trainable)} values, "
                                      f"{per_sync} per sync; each rank sends {per_sync} of gradients per step")
    assert rows["data"].startswith("chat (train.jsonl") and "runs/lora-chat/adapters" in rows["checkpoints"]
    assert rows["command"] == "macrun train --hosts hosts.json --push-model runs/lora-chat.yaml"
    text = run_config_text(plan, tmp_path)
    assert "from " + str(REPO / "configs" / "lora-chat.yaml") + " --set train.steps=30 --set " \
           "model.path=tiny-org/llama-4bit --set data.path=chat --set finetune.type=lora" in text.splitlines()[0]


def test_the_plan_shows_islands_where_the_launch_will_offer_them() -> None:
    def host(name: str, i: int, cable: str | None) -> RingHost:
        links = [Link("wifi0", "wifi", (f"10.9.0.{i}/24",))]
        if cable:
            links.append(Link("thunderbolt0", "thunderbolt", (cable,)))
        return RingHost(name, 1, f"10.9.0.{i}", tuple(links))

    room = [host("studio1", 1, "10.100.0.1/30"), host("studio2", 2, "10.100.0.2/30"), host("air", 3, None)]
    islands = plan_islands(room)
    assert islands is not None
    ring = plan_ring(room, "auto")
    assert describe_links(ring, islands).endswith("; islands: {studio1 studio2} over Thunderbolt, {air}: DDP inside "
                                                  "each, DiLoCo between them over the network")
    cfg = load_config(None, ["strategy.inner_steps=50"])
    assert describe_strategy(cfg, 3, ring.link, islands=True)[0] == "islands"
    assert describe_strategy(load_config(None, ["strategy.mode=diloco"]), 3, ring.link, islands=True)[0] == "diloco"
    assert describe_strategy(load_config(None, ["strategy.mode=islands"]), 3, "network")[0] == "diloco"
    assert describe_strategy(load_config(None, ["strategy.mode=islands"]), 3, "thunderbolt")[0] == "ddp"
    assert "only the islands' leaders use the network" in describe_traffic(cfg, "islands", 1000, 3)
