"""launcher/room/known_hosts.py on real files: every entry form OpenSSH writes, markers, and lines it must survive."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import struct
from pathlib import Path

import pytest

from distributed.errors import HostError
from launcher.room import known_hosts as kh


def blob(kind: str = "ssh-ed25519", body: bytes = b"key-one") -> bytes:
    """A key in SSH wire format: the type string, then (here) arbitrary key material."""
    return struct.pack(">I", len(kind)) + kind.encode() + struct.pack(">I", len(body)) + body


def line(names: str, key: bytes = blob(), kind: str = "ssh-ed25519", marker: str = "") -> str:
    return f"{marker + ' ' if marker else ''}{names} {kind} {base64.b64encode(key).decode()} a comment"


def hashed(name: str, salt: bytes = b"0123456789abcdefghij") -> str:
    """`|1|salt|HMAC-SHA1(salt, name)`, as `ssh-keygen -H` writes a name."""
    mac = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(mac).decode()}"


def write(tmp_path: Path, *lines: str | bytes) -> Path:
    path = tmp_path / "known_hosts"
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


@pytest.fixture(autouse=True)
def _fresh_notes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kh, "_noted", set())  # "once per process" must not leak between tests


@pytest.mark.parametrize("names,asked,found", [
    ("studio.local", "studio.local", True),
    ("Studio.Local", "studio.local", True),  # names compare case-insensitively
    ("mini,studio.local,192.168.1.20", "studio.local", True),
    ("[studio.local]:2222", "[studio.local]:2222", True),
    ("studio.local", "[studio.local]:2222", False),  # another port is another host
    ("[studio.local]:2222", "studio.local", False),
    ("*.local", "studio.local", True),
    ("*.local,!air.local", "air.local", False),  # a matching negation wins over any positive pattern
    ("*.local,!air.local", "studio.local", True),
    ("!air.local", "studio.local", False),  # negations alone match nothing
    ("studio.loca?", "studio.local", True),
    ("[studio.local]:22*", "[studio.local]:2222", True),
    ("studio", "studio.local", False),
])
def test_host_patterns(tmp_path: Path, names: str, asked: str, found: bool) -> None:
    keys = kh.lookup([write(tmp_path, line(names))], asked)
    assert bool(keys) is found
    if found:
        assert keys.find(blob()) is not None and keys.key_types() == ["ssh-ed25519"]


def test_hashed_names_plain_and_with_port(tmp_path: Path) -> None:
    path = write(tmp_path, line(hashed("studio.local")), line(hashed("[10.0.0.2]:2222"), blob(body=b"two")))
    assert kh.lookup([path], "studio.local").find(blob()) is not None
    assert kh.lookup([path], "[10.0.0.2]:2222").find(blob(body=b"two")) is not None
    assert not kh.lookup([path], "mini.local") and not kh.lookup([path], "10.0.0.2")


def test_several_files_and_several_keys(tmp_path: Path) -> None:
    first = write(tmp_path, line("h", blob("ssh-rsa", b"r"), "ssh-rsa"))
    (tmp_path / "etc").mkdir()
    second = (tmp_path / "etc" / "ssh_known_hosts")
    second.write_text(line("h") + "\n")
    keys = kh.lookup([first, tmp_path / "missing", second], "h")
    assert keys.key_types() == ["ssh-rsa", "ssh-ed25519"]
    assert [(k.path, k.line) for k in keys.keys] == [(first, 1), (second, 1)]


def test_verify_known_unknown_changed(tmp_path: Path) -> None:
    path = write(tmp_path, line("h"))
    assert kh.verify(kh.lookup([path], "h"), "ssh-ed25519", blob(), where="h (h:22)", host="h") is True
    assert kh.verify(kh.lookup([path], "other"), "ssh-ed25519", blob(), where="o", host="o") is False
    with pytest.raises(HostError, match="CHANGED") as err:
        kh.verify(kh.lookup([path], "h"), "ssh-ed25519", blob(body=b"new"), where="h (h:22)", host="h")
    assert f"{path} line 1" in err.value.message and kh.fingerprint(blob(body=b"new")) in err.value.message
    assert "ssh-keygen -R h" in (err.value.hint or "")


def test_revoked_key_is_refused_naming_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "# revoked after the laptop was stolen", line("*", marker="@revoked"), line("h"))
    keys = kh.lookup([path], "h")
    assert [k.line for k in keys.revoked] == [2] and [k.line for k in keys.keys] == [3]
    with pytest.raises(HostError, match="REVOKED") as err:
        kh.verify(keys, "ssh-ed25519", blob(), where="h (h:22)", host="h")  # even though line 3 trusts it
    assert f"{path} line 2" in err.value.message and kh.fingerprint(blob()) in err.value.message
    # A revoked key does not make the host known, and only blocks the key it names.
    only_revoked = kh.lookup([write(tmp_path, line("h", marker="@revoked"))], "h")
    assert not only_revoked
    assert kh.verify(only_revoked, "ssh-ed25519", blob(body=b"fresh"), where="h", host="h") is False
    with pytest.raises(HostError, match="REVOKED"):
        kh.verify(only_revoked, "ssh-ed25519", blob(), where="h", host="h")


def test_cert_authority_and_bad_lines_are_skipped_with_one_note_each(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path,
                 line("*.local", blob(body=b"ca"), marker="@cert-authority"),
                 "studio.local ssh-ed25519",  # truncated
                 "studio.local ssh-ed25519 !!!not-base64!!!",
                 line("studio.local", blob("ssh-rsa"), "ssh-ed25519"),  # the type field lies
                 line("studio.local", marker="@future-marker"),
                 "studio.local 2048 65537 1234567",  # SSH1 RSA
                 b"\xff\xfe binary \x00 junk",
                 "",
                 "   # an indented comment",
                 line("studio.local"))
    caplog.set_level(logging.WARNING, logger="macrun.known_hosts")
    for _ in range(3):  # three connections: the notes are not repeated
        keys = kh.lookup([path], "studio.local")
        assert [k.line for k in keys.keys] == [10] and not keys.revoked
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 7, notes
    assert notes[0] == (f"note: {path} line 1: @cert-authority lines (host certificates) are not supported "
                        "by macrun; skipped")
    assert all(n.startswith(f"note: {path} line ") and "\n" not in n for n in notes)
    assert [n.split(" line ")[1].split(":")[0] for n in notes] == ["1", "2", "3", "4", "5", "6", "7"]


def test_unreadable_or_odd_files_know_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert not kh.lookup([folder, tmp_path / "missing"], "h")
    assert not kh.lookup([write(tmp_path, b"\x00" * 100)], "h")


def test_append_creates_private_file_and_keeps_lines_apart(tmp_path: Path) -> None:
    path = tmp_path / "new" / ".ssh" / "known_hosts"
    kh.append(path, "[h]:2222", "ssh-ed25519", base64.b64encode(blob()).decode())
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    path.write_text(path.read_text().rstrip("\n"))  # someone's editor dropped the last newline
    kh.append(path, "h", "ssh-ed25519", base64.b64encode(blob(body=b"2")).decode())
    assert len(path.read_text().splitlines()) == 2
    assert kh.lookup([path], "[h]:2222").find(blob()) and kh.lookup([path], "h").find(blob(body=b"2"))


def test_describe_names_key_types_as_ssh_keygen_does() -> None:
    assert kh.describe("ssh-ed25519", blob()).startswith("ED25519 SHA256:")
    assert kh.describe("ecdsa-sha2-nistp256", blob()).startswith("ECDSA SHA256:")
    assert kh.describe("ssh-rsa", blob()).startswith("RSA SHA256:")
    assert kh.host_name("h", 22) == "h" and kh.host_name("h", 2222) == "[h]:2222"
