"""How the elastic loop reads one attempt's result: finished, planned change, restartable fault, or final."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.jobs.elastic import _classify
from launcher.jobs.results import RankResult, RankState, RunResult


def rank(r: int, state: RankState, code: int | None = 0, reason: str = "", detected: float | None = None) -> RankResult:
    return RankResult(rank=r, host_name=f"h{r}", state=state, exit_code=code, started=0.0, ended=1.0, reason=reason,
                      last_lines=[], log_path=Path("x"), detected_after=detected)


def result(*ranks: RankResult, code: int = 1, first: int | None = None, **kw: object) -> RunResult:
    failure = next((r for r in ranks if r.rank == first), None)
    return RunResult(exit_code=code, ranks=list(ranks), interrupted=bool(kw.pop("interrupted", False)),
                     first_failure=failure, **kw)  # type: ignore[arg-type]


def test_success_is_done_and_ctrl_c_is_final() -> None:
    assert _classify(result(rank(0, RankState.SUCCEEDED), code=0)).kind == "done"
    assert _classify(result(rank(0, RankState.SUCCEEDED), code=130, interrupted=True)).kind == "final"


def test_a_low_battery_or_a_rejoining_host_is_a_planned_stop_only_when_every_rank_stopped_cleanly() -> None:
    ok = [rank(0, RankState.SUCCEEDED), rank(1, RankState.SUCCEEDED)]
    assert _classify(result(*ok, code=0, leaving={"h1": "on battery at 12%"})).kind == "planned"
    assert _classify(result(*ok, code=0, rejoining=["h2"])).kind == "planned"
    stuck = [rank(0, RankState.STUCK, 143, "stuck: ..."), rank(1, RankState.KILLED, 143)]
    outcome = _classify(result(*stuck, first=0, rejoining=["h2"]))
    assert (outcome.kind, outcome.cause) == ("fault", "stuck")  # the stop itself hung: a fault, restarted


@pytest.mark.parametrize(("state", "code", "cause"), [
    (RankState.LOST, None, "lost"), (RankState.STUCK, 143, "stuck"), (RankState.FAILED, 137, "failed"),
    (RankState.FAILED, 1, "failed"), (RankState.FAILED, 75, "failed")])
def test_faults_are_restartable_with_their_cause_and_detection_time(state: RankState, code: int | None,
                                                                   cause: str) -> None:
    outcome = _classify(result(rank(0, RankState.KILLED, 143), rank(1, state, code, "why", 10.4), first=1))
    assert (outcome.kind, outcome.cause, outcome.rank, outcome.host) == ("fault", cause, 1, "h1")
    assert outcome.reason == "why" and outcome.detected_after == 10.4


@pytest.mark.parametrize("code", [2, 3])
def test_a_rank_that_says_its_input_is_wrong_is_not_restarted(code: int) -> None:
    outcome = _classify(result(rank(0, RankState.FAILED, code, "config error"), first=0))
    assert (outcome.kind, outcome.cause) == ("final", "failed")
