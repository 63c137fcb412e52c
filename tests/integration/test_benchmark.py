"""`macrun benchmark` on local ranks: real processes, a real MLX ring over loopback, the real CLI.

The checks a bug would break: every size is timed and checked; the figures (busbw, its share of the
measured link) follow from the times; a corrupted result is caught and fails the run; a bad option is one
error line with exit 2 and starts nothing; --compare and --plot read and write what they promise.
"""

from __future__ import annotations

import json
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from distributed.bench import busbw, check_period, parse_event, shared_paths
from distributed.errors import UsageError
from distributed.links import Link
from launcher.benchmark import FORMAT, parse_sizes, read_report
from tests.lab.scripts.macrun_proc import MACRUN, assert_one_error, cli_env

pytestmark = pytest.mark.timeout(120)


def benchmark(tmp_path: Path, *args: str, env_extra: dict[str, str] | None = None,
              timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """`macrun benchmark ARGS` in tmp_path with an empty HOME; its output once it has ended."""
    env = {**cli_env(tmp_path / "home"), **(env_extra or {})}
    return subprocess.run([MACRUN, "benchmark", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def read_png(data: bytes) -> tuple[int, int, set[tuple[int, int, int]]]:
    """Width, height and the set of colours of an 8-bit RGB PNG with filter-0 rows, every chunk's CRC checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks = 8, {}
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body, crc = data[at + 8:at + 8 + length], struct.unpack(">I", data[at + 8 + length:at + 12 + length])[0]
        assert zlib.crc32(kind + body) == crc, kind
        chunks[kind] = chunks.get(kind, b"") + body
        at += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2) and b"IEND" in chunks
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == height * (1 + 3 * width)
    rows = [raw[r * (1 + 3 * width):(r + 1) * (1 + 3 * width)] for r in range(height)]
    assert all(row[0] == 0 for row in rows)
    return width, height, {tuple(row[i:i + 3]) for row in rows for i in range(1, len(row), 3)}


# ---- the pure parts -----------------------------------------------------------------------------------------


def test_sizes_parse_with_binary_units_and_bad_ones_are_usage_errors() -> None:
    assert parse_sizes("1K,64K,16M, 4") == (1024, 65536, 16 << 20, 4)
    assert parse_sizes("2KiB,1kb,1K") == (2048, 1024)  # repeats dropped, order kept
    assert parse_sizes("6", "bfloat16") == (6,)
    for bad in ("1Q", "", "1K,,2K", "-4", "6", "0"):
        with pytest.raises(UsageError):
            parse_sizes(bad)


def test_busbw_is_the_nccl_tests_convention_and_the_check_stays_exact() -> None:
    assert busbw(1000, 1.0, 2) == 1000  # 2(n-1)/n = 1
    assert busbw(3000, 1.0, 3) == pytest.approx(4000)  # 4/3
    assert busbw(1 << 20, 0.5, 8) == pytest.approx((1 << 21) * 14 / 8)
    # bf16 holds integers exactly up to 256: the pattern's largest sum period·n(n+1)/2 must fit.
    for world in (2, 3, 8, 22):
        period = check_period(world, "bfloat16")
        assert period >= 1 and period * world * (world + 1) // 2 <= 256
    assert check_period(23, "bfloat16") == 0  # 276 > 256: no exact pattern, a tolerance is used
    assert check_period(1000, "float32") == 4


def test_shared_paths_pair_interfaces_on_one_subnet() -> None:
    a = [Link("lo", "loopback", ("127.0.0.1/8",)), Link("en0", "wifi", ("192.168.1.10/24",)),
         Link("bridge0", "thunderbolt", ("10.0.1.1/30",)), Link("en5", "ethernet", ("10.9.0.1/24",), up=False)]
    b = [Link("lo", "loopback", ("127.0.0.1/8",)), Link("en0", "wifi", ("192.168.1.11/24",)),
         Link("bridge0", "thunderbolt", ("10.0.1.2/30",)), Link("en5", "ethernet", ("10.9.0.2/24",))]
    paths = shared_paths(a, b, same_host=False)
    assert [(p["kind"], p["from_addr"], p["to_addr"]) for p in paths] == [
        ("thunderbolt", "10.0.1.1", "10.0.1.2"), ("wifi", "192.168.1.10", "192.168.1.11")]  # en5 is down
    assert shared_paths(a, b, same_host=True)[0]["kind"] == "loopback"


def test_events_are_found_in_prefixed_lines_only_when_well_formed() -> None:
    assert parse_event('[rank 0 h0] MACRUN-BENCH {"event":"done"}') == {"event": "done"}
    assert parse_event("[rank 0 h0] MACRUN-BENCH {not json") is None
    assert parse_event("[rank 0 h0] step 3") is None


# ---- the command --------------------------------------------------------------------------------------------


def test_allreduce_on_two_local_ranks_reports_every_size_checked(tmp_path: Path) -> None:
    out = tmp_path / "a.json"
    proc = benchmark(tmp_path, "--type", "allreduce", "--nproc", "2", "--sizes", "1K,64K", "--iters", "3",
                     "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MACRUN-BENCH" not in proc.stdout  # the rank's result lines are the launcher's, not the user's
    report = read_report(out)
    assert report["format"] == FORMAT and report["type"] == "allreduce" and report["world_size"] == 2
    assert report["complete"] and report["exit_code"] == 0
    assert [r["bytes"] for r in report["results"]] == [1024, 65536]
    assert report["launcher"]["mlx"] and all(h["mlx"] for h in report["hosts"]) and len(report["hosts"]) == 2
    assert len(report["links"]) == 2 and report["link_bytes_s"] == min(x["bandwidth_bytes_s"] for x in report["links"])
    for row in report["results"]:
        t = row["time_s"]
        assert row["iterations"] == 3 and 0 < t["min"] <= t["median"] <= t["max"]
        assert row["busbw_bytes_s"] > 0 and row["busbw_bytes_s"] == pytest.approx(busbw(row["bytes"], t["median"], 2))
        assert row["busbw_share"] == pytest.approx(row["busbw_bytes_s"] / report["link_bytes_s"])
        # every result of every rank, warm-up included, was compared with the exact sum
        assert row["check"] == {"passed": True, "exact": True, "results": 2 * (row["iterations"] + row["warmup"]),
                                "wrong_elements": 0}
    assert "all_sum, float32, 2 ranks" in proc.stdout and "64 KiB" in proc.stdout


def test_compare_and_plot_use_an_earlier_result(tmp_path: Path) -> None:
    before = tmp_path / "before.json"
    first = benchmark(tmp_path, "--nproc", "2", "--sizes", "4K,256K", "--iters", "3", "--json", str(before))
    assert first.returncode == 0, first.stdout + first.stderr
    plot = tmp_path / "busbw.png"
    second = benchmark(tmp_path, "--nproc", "2", "--sizes", "4K,256K,1M", "--iters", "3", "--dtype", "bfloat16",
                       "--compare", str(before), "--plot", str(plot), "--json", str(tmp_path / "now.json"))
    assert second.returncode == 0, second.stdout + second.stderr
    table = second.stdout[second.stdout.index("change from"):].splitlines()
    old, new = read_report(before), read_report(tmp_path / "now.json")
    assert new["results"][0]["dtype"] == "bfloat16" and all(r["check"]["passed"] for r in new["results"])
    for size, label in ((4096, "4 KiB"), (262144, "256 KiB")):
        row = next(line for line in table if line.strip().startswith(label))
        was = next(r for r in old["results"] if r["bytes"] == size)["busbw_bytes_s"]
        now = next(r for r in new["results"] if r["bytes"] == size)["busbw_bytes_s"]
        assert f"{now / was - 1:+.0%}" in row, row
    assert any(line.strip().startswith("1 MiB") and " - " in line for line in table)  # nothing to compare with
    width, height, colours = read_png(plot.read_bytes())
    assert (width, height) == (900, 540)
    assert {(31, 119, 180), (214, 39, 40)} <= colours  # this run's line and the earlier run's


def test_a_corrupted_result_fails_the_run_and_names_it(tmp_path: Path) -> None:
    out = tmp_path / "bad.json"
    proc = benchmark(tmp_path, "--nproc", "2", "--sizes", "1K", "--iters", "3", "--json", str(out),
                     env_extra={"MACRUN_BENCH_FAULT": "1:2"})
    assert_one_error(proc, 1, "all_sum of 1 KiB gave wrong results: 1 wrong element(s); first on rank 1")
    check = read_report(out)["results"][0]["check"]
    assert not check["passed"] and check["first"]["rank"] == 1 and check["first"]["iteration"] == 2
    assert check["first"]["got"] == check["first"]["want"] + 1


def test_latency_and_bandwidth_on_local_ranks(tmp_path: Path) -> None:
    lat = benchmark(tmp_path, "--type", "latency", "--nproc", "2", "--sizes", "4,64", "--iters", "3",
                    "--json", str(tmp_path / "lat.json"))
    assert lat.returncode == 0, lat.stdout + lat.stderr
    report = json.loads((tmp_path / "lat.json").read_text())
    assert [r["bytes"] for r in report["results"]] == [4, 64] and all(r["check"]["passed"] for r in report["results"])
    (pp,) = report["pingpong"]
    assert (pp["rank"], pp["to"]) == (0, 1) and 0 < pp["time_s"]["min"] <= pp["time_s"]["median"]
    bw = benchmark(tmp_path, "--type", "bandwidth", "--nproc", "2", "--json", str(tmp_path / "bw.json"))
    assert bw.returncode == 0, bw.stdout + bw.stderr
    pairs = json.loads((tmp_path / "bw.json").read_text())["pairs"]
    assert sorted((p["rank"], p["to"]) for p in pairs) == [(0, 1), (1, 0)]
    assert all(p["kind"] == "loopback" and p["bandwidth_bytes_s"] > 1e6 and p["rtt_s"] > 0 for p in pairs)


@pytest.mark.parametrize(("args", "needle"), [
    (["--sizes", "1K,banana"], "--sizes: 'banana' is not a size"),
    (["--sizes", "6"], "--sizes: 6 is not a whole number of float32 elements"),
    (["--type", "diloco"], "--type 'diloco' is not one of allreduce, bandwidth, latency"),
    (["--compare", "missing.json"], "cannot read missing.json"),
    (["--nproc", "1"], "a benchmark needs at least two ranks; --nproc gives 1"),
])
def test_bad_options_are_one_error_line_and_start_nothing(tmp_path: Path, args: list[str], needle: str) -> None:
    proc = benchmark(tmp_path, "--nproc", "2", *args, timeout=30)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "runs").exists()  # refused before any rank was started
