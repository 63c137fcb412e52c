"""Unit tests for launcher/room/hosts.py: validation messages, defaults, MLX interop, saving, rank layout."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from distributed.errors import HostsError
from launcher.room.hosts import (
    HostSpec,
    RankSlot,
    layout_ranks,
    load_hosts,
    local_hosts,
    parse_hosts,
    save_hosts,
    to_json,
    write_mlx_hostfile,
)

REPO = Path(__file__).resolve().parents[2]
CASES_DIR = Path(__file__).resolve().parent / "hosts_cases"
MISSING = object()  # the case's file does not exist


def _hosts(*entries: Any, **top: Any) -> dict[str, Any]:
    return {**top, "hosts": list(entries)}


# (id, file content, fragments the message must contain). Content: a dict/list is written as JSON, a str
# or bytes as is, "case:<name>" copies tests/unit/hosts_cases/<name>, MISSING writes nothing.
BAD_FILES: list[tuple[str, Any, list[str]]] = [
    ("missing", MISSING, ["not found"]),
    ("empty", "case:empty.json", ["is empty"]),
    ("blank", "  \n\t\n", ["is empty"]),
    ("not-json", '{"hosts": [{"host": "a"} {"host": "b"}]}', ["not valid JSON", "line 1, column"]),
    ("comments", "case:comments.json", ["not valid JSON", "line 3"]),
    ("trailing-comma", "case:trailing_comma.json", ["not valid JSON", "line 5"]),
    ("single-quotes", "case:single_quotes.json", ["not valid JSON", "line 3"]),
    ("not-utf8", b'{"hosts": [{"host": "caf\xe9"}]}', ["not UTF-8"]),
    ("top-level-string", '"studio.local"', ["must be an object", '"studio.local"']),
    ("top-level-number", "42", ["must be an object", "42"]),
    ("hosts-missing", {"defaults": {"slots": 1}}, ['field "hosts" is missing']),
    ("hosts-not-list", {"hosts": {"host": "a"}}, ['field "hosts" must be a non-empty list']),
    ("hosts-empty", {"hosts": []}, ['field "hosts" must be a non-empty list', "got []"]),
    ("unknown-top", {"host": [{"host": "a"}]}, ['unknown field "host"']),
    ("entry-not-object", _hosts({"host": "a"}, "mbp.local"), ["hosts[1]", "must be an object"]),
    ("unknown-field", _hosts({"host": "a", "slot": 2}), ['hosts[0] ("a")', 'unknown field "slot"']),
    ("alias-field", _hosts({"hostname": "a"}), ["hosts[0]", 'unknown field "hostname"']),
    ("unknown-default", _hosts({"host": "a"}, defaults={"pyhton": "python3"}),
     ["defaults", 'unknown field "pyhton"']),
    ("per-host-default", _hosts({"host": "a"}, defaults={"ips": ["10.0.0.1"]}),
     ["defaults", 'field "ips" cannot be a default']),
    ("defaults-not-object", _hosts({"host": "a"}, defaults=["ada"]), ["defaults", "must be an object"]),
    ("neither-host-nor-ssh", _hosts({"host": "a"}, {"name": "mini"}),
     ['hosts[1] ("mini")', 'field "host"', 'field "ssh"']),
    ("host-and-ssh", _hosts({"host": "a", "ssh": "lab-mini"}), ["hosts[0]", 'field "ssh"', "got both"]),
    ("port-string", _hosts({"host": "a", "port": "22"}), ['hosts[0] ("a")', 'field "port"', 'got "22"']),
    ("port-bool", _hosts({"host": "a", "port": True}), ['field "port"', "got true"]),
    ("port-zero", _hosts({"host": "a", "port": 0}), ['field "port"', "1 to 65535", "got 0"]),
    ("port-too-big", _hosts({"host": "a", "port": 70000}), ['field "port"', "got 70000"]),
    ("slots-string", _hosts({"host": "a"}, {"host": "b"}, {"host": "mbp.local", "slots": "two"}),
     ['hosts[2] ("mbp.local"): field "slots" must be a positive integer, got "two"']),
    ("slots-zero", _hosts({"host": "a", "slots": 0}), ['field "slots"', "got 0"]),
    ("slots-bool", _hosts({"host": "a", "slots": True}), ['field "slots"', "got true"]),
    ("slots-float", _hosts({"host": "a", "slots": 2.0}), ['field "slots"', "got 2.0"]),
    ("default-slots-bad", _hosts({"host": "a"}, defaults={"slots": -1}), ["defaults", 'field "slots"']),
    ("ips-string", _hosts({"host": "a", "ips": "10.0.0.1"}), ['field "ips"', "must be a list"]),
    ("ips-not-strings", _hosts({"host": "a", "ips": [10]}), ['field "ips"', "list of IPv4"]),
    ("ips-invalid", _hosts({"host": "a", "ips": ["192.168.1.300"]}), ['field "ips"', "192.168.1.300"]),
    ("ips-ipv6", _hosts({"host": "a", "ips": ["fe80::1"]}), ['field "ips"', "IPv6"]),
    ("ips-unspecified", _hosts({"host": "a", "ips": ["0.0.0.0"]}), ['field "ips"', "0.0.0.0"]),
    ("fast-ips-twice", _hosts({"host": "a", "fast_ips": ["169.254.1.1", "169.254.1.1"]}),
     ['field "fast_ips"', "twice"]),
    ("labels-not-strings", _hosts({"host": "a", "labels": ["m2", 3]}), ['field "labels"']),
    ("labels-string", _hosts({"host": "a", "labels": "m2"}), ['field "labels"']),
    ("python-empty", _hosts({"host": "a", "python": ""}), ['field "python"', "non-empty"]),
    ("workdir-number", _hosts({"host": "a", "workdir": 5}), ['field "workdir"']),
    ("user-with-space", _hosts({"host": "a", "user": "ada lovelace"}), ['field "user"', "spaces"]),
    ("host-with-user", _hosts({"host": "ada@studio.local"}), ['field "host"', "user name"]),
    ("host-with-port", _hosts({"host": "studio.local:2222"}), ['field "host"', "port"]),
    ("host-spaces", _hosts({"host": "studio local"}), ['field "host"', "spaces"]),
    ("host-odd-chars", _hosts({"host": "studio/local"}), ['field "host"', "host name or IP address"]),
    ("name-odd-chars", _hosts({"name": "my studio", "host": "a"}),
     ['hosts[0] ("my studio")', 'field "name"']),
    ("name-from-host-invalid", _hosts({"host": "_studio"}), ['field "name"', "taken from the host"]),
    ("duplicate-name", _hosts({"name": "mac", "host": "a"}, {"name": "Mac", "host": "b"}),
     ['hosts[1] ("Mac")', 'field "name"', 'hosts[0] ("mac")']),
    ("duplicate-target", _hosts({"name": "one", "host": "10.0.0.1"}, {"name": "two", "host": "10.0.0.1",
                                                                      "port": 22}),
     ['hosts[1] ("two")', 'field "host"', "same machine"]),
    ("duplicate-key", "case:duplicate_key.json", ["hosts[0]", 'field "slots" is written twice']),
    ("identity-missing", _hosts({"host": "a", "identity_file": "no_such_key"}),
     ['field "identity_file"', "no_such_key"]),
    ("mlx-entry-not-object", ["studio.local"], ["entry [0]", "must be an object"]),
    ("mlx-no-ssh", [{"ssh": "a"}, {"ips": ["10.0.0.2"]}], ["entry [1]", 'field "ssh" is missing']),
    ("mlx-unknown", [{"ssh": "a", "ip": ["10.0.0.1"]}], ['entry [0] ("a")', 'unknown field "ip"', ]),
    ("mlx-bad-ip", [{"ssh": "a", "ips": ["10.0.0"]}], ['field "ips"', "10.0.0"]),
    ("mlx-split-repeats", [{"ssh": "a"}, {"ssh": "b"}, {"ssh": "a"}], ['entry [2] ("a")', 'field "ssh"']),
    ("mlx-empty", [], ["non-empty list"]),
    # Hostile input: RecursionError and Python's 4,300-digit int limit became tracebacks before.
    ("nested-100000-deep", "[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
    ("entry-900-deep", '{"hosts": [' + "[" * 900 + "]" * 900 + "]}", ["hosts[0]", "must be an object"]),
    ("port-5001-digits", '{"hosts": [{"host": "a", "port": ' + "9" * 5001 + "}]}",
     ['hosts[0] ("a"): field "port" must be an integer from 1 to 65535, got a 5,001-digit number']),
    ("default-slots-5001-digits", '{"defaults": {"slots": -' + "9" * 5001 + '}, "hosts": [{"host": "a"}]}',
     ["defaults", 'field "slots"', "5,001-digit number"]),
    ("mlx-ips-5001-digits", '[{"ssh": "a", "ips": [' + "9" * 5001 + "]}]", ['field "ips"', "5,001-digit"]),
]


def _write_case(tmp_path: Path, content: Any) -> Path:
    path = tmp_path / "hosts.json"
    if content is MISSING:
        return path
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str) and content.startswith("case:"):
        path.write_bytes((CASES_DIR / content[5:]).read_bytes())
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content, indent=2))
    return path


def test_enough_bad_cases() -> None:
    assert len(BAD_FILES) >= 20
    assert len({case_id for case_id, _, _ in BAD_FILES}) == len(BAD_FILES)


@pytest.mark.parametrize(("content", "fragments"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_hosts_file(tmp_path: Path, content: Any, fragments: list[str]) -> None:
    path = _write_case(tmp_path, content)
    with pytest.raises(HostsError) as info:
        load_hosts(path)
    err = info.value
    message = str(err)
    assert err.exit_code == 2
    assert "\n" not in message and "\r" not in message
    assert message.startswith(f"{path}: "), message  # names the file first
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert err.hint and err.hint.strip() and "\n" not in err.hint


def test_unknown_field_hints_nearest() -> None:
    with pytest.raises(HostsError) as info:
        parse_hosts(_hosts({"host": "a", "slot": 2}), "hosts.json")
    assert 'did you mean "slots"' in (info.value.hint or "")
    with pytest.raises(HostsError) as info:
        parse_hosts(_hosts({"host": "a", "key_file": "k"}), "hosts.json")
    assert 'did you mean "identity_file"' in (info.value.hint or "")


def test_exact_message_format() -> None:
    data = _hosts({"host": "a"}, {"host": "b"}, {"host": "mbp.local", "slots": "two"})
    with pytest.raises(HostsError) as info:
        parse_hosts(data, "hosts.json")
    assert str(info.value) == ('hosts.json: hosts[2] ("mbp.local"): '
                               'field "slots" must be a positive integer, got "two"')


def test_json_comment_and_trailing_comma_hints(tmp_path: Path) -> None:
    hints = {}
    for name in ("comments.json", "trailing_comma.json"):
        with pytest.raises(HostsError) as info:
            load_hosts(_write_case(tmp_path, f"case:{name}"))
        hints[name] = info.value.hint or ""
    assert '"_comment"' in hints["comments.json"]
    assert "comma" in hints["trailing_comma.json"]


def test_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(HostsError, match="is a directory"):
        load_hosts(tmp_path)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated home folder holding ~/.ssh/id_ed25519, which the example file names."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("not a real key\n")
    monkeypatch.setenv("HOME", str(home))
    return home


def test_example_file_loads(home: Path) -> None:
    hosts = load_hosts(REPO / "hosts.example.json")
    assert [h.name for h in hosts] == ["studio", "mbp.local", "lab-mini"]
    studio, mbp, mini = hosts
    assert studio == HostSpec(name="studio", hostname="192.168.1.20", user="ada", port=22,
                              key_file=str(home / ".ssh" / "id_ed25519"), python="/opt/homebrew/bin/python3",
                              workdir="~/.macrun", slots=2, ips=("192.168.1.20",), fast_ips=("169.254.10.1",),
                              labels=("m2-ultra", "desk"))
    assert (mbp.user, mbp.python, mbp.slots) == ("ada", "/Users/ada/venvs/mlx/bin/python", 1)
    assert mini.hostname == "lab-mini" and mini.user is None  # explicit null beats the default
    doc = json.loads((REPO / "hosts.example.json").read_text())["_doc"]["fields"]
    assert set(doc) == {"name", "host", "ssh", "user", "port", "identity_file", "python", "workdir", "slots",
                        "ips", "fast_ips", "labels"}  # every field is documented


def test_example_key_missing_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(HostsError, match='"studio"\\): field "identity_file"'):
        load_hosts(REPO / "hosts.example.json")
    assert len(load_hosts(REPO / "hosts.example.json", check_files=False)) == 3


def test_defaults_apply_and_entries_override(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "lab"
    key.parent.mkdir()
    key.write_text("k")
    data = _hosts({"host": "a"}, {"host": "b", "user": "bob", "slots": 3, "identity_file": None},
                  {"host": "c", "user": None, "labels": []},
                  defaults={"user": "ada", "port": 2222, "python": "/opt/py", "workdir": "/tmp/w", "slots": 2,
                            "identity_file": "keys/lab", "labels": ["lab"]})
    a, b, c = parse_hosts(data, "hosts.json", base_dir=tmp_path)
    assert a == HostSpec(name="a", hostname="a", user="ada", port=2222, key_file=str(key), python="/opt/py",
                         workdir="/tmp/w", slots=2, labels=("lab",))
    assert (b.user, b.slots, b.key_file, b.port) == ("bob", 3, None, 2222)
    assert (c.user, c.labels, c.slots) == (None, (), 2)


def test_builtin_defaults() -> None:
    (spec,) = parse_hosts(_hosts({"host": "mbp.local"}), "hosts.json")
    assert spec == HostSpec(name="mbp.local", hostname="mbp.local")
    assert (spec.python, spec.workdir, spec.slots) == ("python3", "~/.macrun", 1)
    assert (spec.user, spec.port, spec.key_file) == (None, None, None)


def test_name_defaults_to_host_or_alias() -> None:
    data = _hosts({"host": "10.0.0.5"}, {"ssh": "lab-mini"}, {"name": "desk", "host": "studio.local"})
    specs = parse_hosts(data, "hosts.json")
    assert [(s.name, s.hostname) for s in specs] == [("10.0.0.5", "10.0.0.5"), ("lab-mini", "lab-mini"),
                                                     ("desk", "studio.local")]


def test_underscore_keys_are_ignored() -> None:
    data = {"_doc": {"anything": 1}, "_comment": "x", "defaults": {"_comment": "y", "slots": 2},
            "hosts": [{"_comment": "z", "host": "a"}]}
    (spec,) = parse_hosts(data, "hosts.json")
    assert spec.slots == 2


def test_same_host_other_port_is_allowed() -> None:
    specs = parse_hosts(_hosts({"name": "n1", "host": "127.0.0.1", "port": 2201},
                               {"name": "n2", "host": "127.0.0.1", "port": 2202}), "hosts.json")
    assert [s.port for s in specs] == [2201, 2202]


def test_mlx_hostfile_is_read(tmp_path: Path) -> None:
    path = tmp_path / "hostfile.json"
    path.write_text(json.dumps([{"ssh": "ada@studio.local", "ips": ["192.168.1.20"]},
                                {"ssh": "ada@studio.local", "ips": ["192.168.1.20"]},
                                {"ssh": "10.0.0.7"}, {"ssh": "lab-mini", "ips": [], "rdma": []}]))
    studio, ip_host, mini = load_hosts(path)
    assert studio == HostSpec(name="studio.local", hostname="studio.local", user="ada", slots=2,
                              ips=("192.168.1.20",))
    assert ip_host == HostSpec(name="10.0.0.7", hostname="10.0.0.7")
    assert mini == HostSpec(name="lab-mini", hostname="lab-mini")


def test_mlx_object_form_is_read() -> None:
    data = {"backend": "ring", "envs": ["MLX_METAL_FAST_SYNCH=1"],
            "hosts": [{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]}
    assert [(s.hostname, s.ips) for s in parse_hosts(data, "h.json")] == [("a", ("10.0.0.1",)),
                                                                          ("b", ("10.0.0.2",))]


def test_mlx_hostfile_round_trip(tmp_path: Path) -> None:
    hosts = [HostSpec(name="studio.local", hostname="studio.local", user="ada", slots=2,
                      ips=("192.168.1.20",)),
             HostSpec(name="10.0.0.7", hostname="10.0.0.7"),
             HostSpec(name="mbp.local", hostname="mbp.local")]
    path = tmp_path / "mlx" / "hostfile.json"
    write_mlx_hostfile(hosts, path)
    written = json.loads(path.read_text())
    assert written == [{"ssh": "ada@studio.local", "ips": ["192.168.1.20"]},
                       {"ssh": "ada@studio.local", "ips": ["192.168.1.20"]},
                       {"ssh": "10.0.0.7", "ips": ["10.0.0.7"]},  # an IP hostname doubles as its address
                       {"ssh": "mbp.local"}]  # a name: no ips, MLX resolves it
    assert load_hosts(path) == [hosts[0], replace(hosts[1], ips=("10.0.0.7",)), hosts[2]]
    assert os.listdir(path.parent) == ["hostfile.json"]


def test_mlx_own_parser_reads_our_hostfile(tmp_path: Path) -> None:
    common = pytest.importorskip("mlx._distributed_utils.common", reason="this MLX has no hostfile parser")
    path = tmp_path / "hostfile.json"
    hosts = [HostSpec(name="a", hostname="10.0.0.1", slots=2), HostSpec(name="b", hostname="b")]
    write_mlx_hostfile(hosts, path)
    parsed = common.Hostfile.from_file(str(path))
    assert [(h.ssh_hostname, h.ips) for h in parsed.hosts] == [("10.0.0.1", ["10.0.0.1"]),
                                                               ("10.0.0.1", ["10.0.0.1"]), ("b", [])]


def test_to_json_round_trip(tmp_path: Path) -> None:
    key = tmp_path / "id"
    key.write_text("k")
    hosts = [HostSpec(name="studio", hostname="192.168.1.20", user="ada", port=2222, key_file=str(key),
                      python="/opt/py", workdir="/w", slots=2, ips=("192.168.1.20",),
                      fast_ips=("169.254.1.1",), labels=("m2",)),
             HostSpec(name="mbp.local", hostname="mbp.local")]
    data = to_json(hosts)
    assert data["hosts"][1] == {"host": "mbp.local"}  # only what differs from macrun's defaults
    assert parse_hosts(json.loads(json.dumps(data)), "h.json") == hosts


def _existing_file(path: Path) -> dict[str, Any]:
    doc = {"_doc": {"about": "kept"}, "defaults": {"user": "ada", "slots": 1},
           "hosts": [{"_comment": "desk", "name": "studio", "host": "192.168.1.20", "slots": 2},
                     {"ssh": "lab-mini"},
                     {"host": "mbp.local", "labels": ["laptop"]}]}
    path.write_text(json.dumps(doc, indent=2))
    return doc


def test_save_hosts_merges_and_never_drops(tmp_path: Path) -> None:
    path = tmp_path / "hosts.json"
    before = _existing_file(path)
    updated = HostSpec(name="studio", hostname="192.168.1.21", user="ada", slots=4)
    new = HostSpec(name="air", hostname="air.local", user="ada")
    save_hosts(path, [updated, new])
    after = json.loads(path.read_text())
    assert after["_doc"] == before["_doc"] and after["defaults"] == before["defaults"]
    assert after["hosts"][0] == {"_comment": "desk", "name": "studio", "host": "192.168.1.21", "slots": 4}
    assert after["hosts"][1:3] == before["hosts"][1:3]  # untouched entries stay exactly as written
    assert after["hosts"][3] == {"name": "air", "host": "air.local"}  # user: from the file's defaults
    specs = load_hosts(path)
    assert [s.name for s in specs] == ["studio", "lab-mini", "mbp.local", "air"]
    assert specs[0] == updated and specs[3] == new
    assert sorted(os.listdir(tmp_path)) == ["hosts.json"]  # no temp file left behind


def test_save_hosts_keeps_alias_and_overrides_default_user(tmp_path: Path) -> None:
    path = tmp_path / "hosts.json"
    _existing_file(path)
    save_hosts(path, [HostSpec(name="lab-mini", hostname="lab-mini", slots=2)])
    entry = json.loads(path.read_text())["hosts"][1]
    assert entry == {"ssh": "lab-mini", "user": None, "slots": 2}
    assert load_hosts(path)[1] == HostSpec(name="lab-mini", hostname="lab-mini", slots=2)


def test_save_hosts_creates_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "hosts.json"
    hosts = [HostSpec(name="a", hostname="10.0.0.1"), HostSpec(name="b", hostname="10.0.0.2", slots=2)]
    save_hosts(path, hosts)
    assert load_hosts(path) == hosts
    save_hosts(path, [HostSpec(name="c", hostname="10.0.0.3")])
    assert [h.name for h in load_hosts(path)] == ["a", "b", "c"]


def test_save_hosts_bad_merge_leaves_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "hosts.json"
    _existing_file(path)
    original = path.read_bytes()
    with pytest.raises(HostsError, match="same machine"):  # a new name for a machine already listed
        save_hosts(path, [HostSpec(name="desk", hostname="192.168.1.20")])
    assert path.read_bytes() == original


def test_save_hosts_refuses_broken_or_mlx_file(tmp_path: Path) -> None:
    path = tmp_path / "hosts.json"
    for text, match in (('{"hosts": [', "not valid JSON"), ('[{"ssh": "a"}]', "MLX hostfile")):
        path.write_text(text)
        with pytest.raises(HostsError, match=match):
            save_hosts(path, [HostSpec(name="b", hostname="b")])
        assert path.read_text() == text


def test_save_hosts_is_atomic_when_the_rename_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "hosts.json"
    _existing_file(path)
    original = path.read_bytes()

    def fail_replace(src: str, dst: str) -> None:
        assert Path(src).parent == tmp_path and Path(src).read_text().startswith("{")  # fully written temp
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(OSError, match="No space"):
        save_hosts(path, [HostSpec(name="b", hostname="b")])
    assert path.read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == ["hosts.json"]


def test_layout_ranks_follows_file_order_and_slots() -> None:
    a, b, c = (HostSpec(name=n, hostname=n, slots=s) for n, s in (("a", 2), ("b", 1), ("c", 3)))
    slots = layout_ranks([a, b, c])
    assert [(s.rank, s.host.name, s.local_rank, s.local_world_size) for s in slots] == [
        (0, "a", 0, 2), (1, "a", 1, 2), (2, "b", 0, 1), (3, "c", 0, 3), (4, "c", 1, 3), (5, "c", 2, 3)]
    assert all(isinstance(s, RankSlot) for s in slots)
    with pytest.raises(AttributeError):
        slots[0].rank = 9  # type: ignore[misc]
    assert layout_ranks([]) == []


def test_local_hosts() -> None:
    (host,) = local_hosts(3)
    assert (host.name, host.hostname, host.slots) == ("localhost", "127.0.0.1", 3)
    assert [s.rank for s in layout_ranks([host])] == [0, 1, 2]
    for bad in (0, -1, True):
        with pytest.raises(HostsError) as info:
            local_hosts(bad)
        assert info.value.exit_code == 2 and info.value.hint
