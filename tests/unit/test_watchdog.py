"""The progress watchdog's verdict, from ranks' progress reports alone."""

from __future__ import annotations

from launcher.jobs.watchdog import FIRST_STEP_TIMEOUT_S, MIN_PROGRESS_TIMEOUT_S, Watch, find_stuck


def rep(step: int, collectives: int, stalled: float, doing: str = "", step_s: float | None = 0.1,
        max_step_s: float | None = 0.2) -> dict:
    return {"step": step, "collectives": collectives, "stalled": stalled, "doing": doing or f"step {step + 1}",
            "step_s": step_s, "max_step_s": max_step_s}


def test_the_rank_that_never_joined_the_collective_is_named() -> None:
    reports = {0: rep(5, 6, 12.0, "gradient all_sum of step 6"), 1: rep(5, 5, 12.5, "skipped the gradient all_sum"),
               2: rep(5, 6, 11.0, "gradient all_sum of step 6")}
    stuck = find_stuck(reports, [0, 1, 2], Watch(timeout=10).timeout_for)
    assert stuck is not None and stuck.culprits == [1]
    assert stuck.stalled == 11.0  # since the most recent step any rank finished
    assert "furthest behind at step 5 with 5 collectives entered" in stuck.reasons[1]
    assert "ranks 0, 2 wait in: gradient all_sum of step 6" in stuck.reasons[1]
    assert stuck.notice({1: "h1"}).endswith("rank 1 (h1) at step 5, doing skipped the gradient all_sum")


def test_lowest_step_wins_over_collectives_and_ties_name_every_rank() -> None:
    reports = {0: rep(7, 9, 30), 1: rep(6, 20, 30), 2: rep(6, 20, 30)}
    stuck = find_stuck(reports, [0, 1, 2], Watch(timeout=10).timeout_for)
    assert stuck is not None and stuck.culprits == [1, 2] and "rank 0 waits in: step 8" in stuck.reasons[1]


def test_not_stuck_while_one_rank_advances_or_before_every_rank_reported() -> None:
    timeout = Watch(timeout=10).timeout_for
    assert find_stuck({0: rep(5, 5, 50), 1: rep(9, 9, 0.5)}, [0, 1], timeout) is None
    assert find_stuck({0: rep(5, 5, 50)}, [0, 1], timeout) is None  # rank 1 still starting
    assert find_stuck({0: rep(5, 5, 9.9), 1: rep(5, 5, 9.9)}, [0, 1], timeout) is None
    assert find_stuck({}, [], timeout) is None


def test_automatic_timeout_scales_with_the_steps() -> None:
    auto = Watch().timeout_for
    assert auto([rep(1, 1, 0, step_s=None, max_step_s=None)]) == MIN_PROGRESS_TIMEOUT_S
    assert auto([rep(1, 1, 0, step_s=0.5), rep(1, 1, 0, step_s=5.0, max_step_s=6.0)]) == 100.0  # 20 x median
    assert auto([rep(1, 1, 0, step_s=1.0, max_step_s=45.0)]) == 135.0  # a slow sync: 3 x the longest step
    assert Watch(timeout=7).timeout_for([rep(1, 1, 0, step_s=100.0)]) == 7  # a set timeout is the timeout


def test_every_rank_in_the_same_collective_blames_the_link_not_a_rank() -> None:
    reports = {r: rep(50, 51, 6.0, "gradient all_sum of step 51") for r in range(3)}
    stuck = find_stuck(reports, [0, 1, 2], Watch(timeout=5).timeout_for)
    assert stuck is not None and stuck.culprits == [0, 1, 2]
    assert "every rank is in the same collective at step 50 (gradient all_sum of step 51)" in stuck.reasons[0]
    assert "a link between them stopped carrying data" in stuck.reasons[0]


def test_the_first_step_of_an_attempt_gets_the_compile_grace_even_under_a_short_timeout() -> None:
    timeout = Watch(timeout=5).timeout_for
    compiling = {0: rep(0, 1, 30, step_s=None, max_step_s=None), 1: rep(0, 1, 30, step_s=None, max_step_s=None)}
    assert find_stuck(compiling, [0, 1], timeout) is None  # 30 s into the first step: still compiling
    late = {r: {**p, "stalled": FIRST_STEP_TIMEOUT_S + 1} for r, p in compiling.items()}
    stuck = find_stuck(late, [0, 1], timeout)
    assert stuck is not None and stuck.timeout == FIRST_STEP_TIMEOUT_S
    resumed = {0: rep(40, 3, 6, step_s=0.1), 1: rep(40, 3, 6, step_s=0.1)}  # a step done: the 5 s holds again
    assert find_stuck(resumed, [0, 1], timeout) is not None
