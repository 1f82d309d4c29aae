"""Policies and their formulas, at unit level (no loop, no server)."""

from __future__ import annotations

import bisect
import itertools
import json
import math
import random

import pytest

from monitor.records import Outcome
from monitor.schedule.adaptive import AdaptivePolicy
from monitor.schedule.durations import EDGES, AgeTable
from monitor.schedule.estimate import (
    Shapes,
    anchor_is_plausible,
    fit_eta,
    fit_eta_origin,
    fit_eta_origin_lagging,
    gaussian_crossing,
    gaussian_overshoot,
    straighten,
)
from monitor.schedule.policy import BackoffPolicy, Policy, make_policy
from monitor.schedule.state import MAX_SAMPLES, ExecState, LazyHeap


def add(policy: Policy, name: str, now: float) -> ExecState:
    state = ExecState(name, now)
    policy.add(state, now)
    return state


def answer_running(policy: Policy, state: ExecState, now: float, progress: int | None = None) -> None:
    """What the scheduler does with a "running" answer."""
    state.polls += 1
    state.last_poll = now
    if progress is not None:
        state.add_sample(now, progress)
    policy.polled(state, now)


# -- backoff ---------------------------------------------------------------------------------------


def test_backoff_cadence_is_the_vendor_pages() -> None:
    policy = BackoffPolicy()
    state = add(policy, "exec_a", 0.0)
    now, polls = 0.0, []
    for _ in range(14):
        assert policy.ready_at(now) == pytest.approx(now)
        chosen = policy.choose(now)
        assert chosen is state
        polls.append(now)
        answer_running(policy, state, now)
        now = policy.ready_at(now)
    gaps = [b - a for a, b in itertools.pairwise(polls)]
    expected = [min(1.0 * 1.5**i, 30.0) for i in range(len(gaps))]
    assert gaps == pytest.approx(expected)
    assert gaps[-1] == 30.0


def test_backoff_serves_fifo_by_due_time_and_nothing_early() -> None:
    policy = BackoffPolicy()
    a, b = add(policy, "exec_a", 0.0), add(policy, "exec_b", 0.5)
    assert policy.choose(0.0) is a  # b is not due before 0.5
    assert policy.choose(0.1) is None
    assert policy.choose(0.6) is b
    answer_running(policy, a, 0.2)  # a: next at 1.2
    answer_running(policy, b, 0.7)  # b: next at 1.7
    assert policy.choose(5.0) is a
    assert policy.choose(5.0) is b
    assert policy.choose(5.0) is None  # both are out (in flight) until answered


def test_a_held_execution_comes_back_at_its_time_first() -> None:
    policy = BackoffPolicy()
    a, b = add(policy, "exec_a", 0.0), add(policy, "exec_b", 0.0)
    assert policy.choose(0.0) is a
    policy.hold(a, 10.0)  # e.g. an error retry
    assert policy.choose(1.0) is b
    assert policy.choose(9.0) is None
    assert policy.ready_at(9.0) == pytest.approx(10.0)
    assert policy.choose(10.0) is a


def test_removed_executions_are_never_chosen() -> None:
    policy = BackoffPolicy()
    a, b = add(policy, "exec_a", 0.0), add(policy, "exec_b", 0.0)
    a.live = False
    policy.remove(a, 0.0)
    assert policy.choose(1.0) is b
    assert policy.choose(1.0) is None
    assert policy.count == 1


def test_make_policy() -> None:
    assert make_policy("backoff").name == "backoff"
    assert make_policy("adaptive").name == "adaptive"
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fastest")


# -- estimators ------------------------------------------------------------------------------------


def test_fit_through_the_origin_recovers_a_linear_run() -> None:
    samples = [(100.0 + x, 100.0 * x / 600.0) for x in (60.0, 240.0, 420.0)]
    eta = fit_eta_origin(samples, 100.0)
    assert eta is not None
    assert eta.at == pytest.approx(700.0)
    assert eta.slope == pytest.approx(100.0 / 600.0)


def test_free_fit_matches_hadoop_late_for_two_samples() -> None:
    (t1, p1), (t2, p2) = (1000.0, 20.0), (1300.0, 50.0)
    eta = fit_eta([(t1, p1), (t2, p2)])
    assert eta is not None
    assert eta.at == pytest.approx(t2 + (100 - p2) * (t2 - t1) / (p2 - p1))


def test_no_progress_means_no_eta() -> None:
    assert fit_eta([(10.0, 5.0), (20.0, 5.0)]) is None
    assert fit_eta([(10.0, 5.0)]) is None
    assert fit_eta_origin([(10.0, 0.0)], 0.0) is None


def test_more_samples_sharpen_the_prediction_and_it_is_calibrated() -> None:
    rng = random.Random(7)
    duration, noise = 1000.0, 1.5
    errors, sds = [], []
    for _ in range(300):
        samples = [(x, round(100 * x / duration + rng.gauss(0, noise))) for x in (200.0, 500.0, 800.0)]
        eta = fit_eta_origin(samples, 0.0)
        assert eta is not None
        errors.append(eta.at - duration)
        sds.append(eta.sd)
    rms = math.sqrt(sum(e * e for e in errors) / len(errors))
    assert 0.6 < rms / (sum(sds) / len(sds)) < 1.6  # sd is about the real error
    few = fit_eta_origin([(200.0, 20.0)], 0.0)
    many = fit_eta_origin([(200.0, 20.0), (500.0, 50.0), (800.0, 80.0)], 0.0)
    assert few is not None
    assert many is not None
    assert many.sd < few.sd


def test_anchor_is_dropped_for_a_run_that_started_before_tracking() -> None:
    # Tracked at 1000 s, but it has been running since 0 s (10 % per 100 s).
    late = [(1000.0 + x, 50.0 + x / 10.0) for x in (50.0, 150.0, 250.0)]
    assert not anchor_is_plausible(late, 1000.0)
    fresh = [(1000.0 + x, x / 10.0) for x in (50.0, 150.0, 250.0)]
    assert anchor_is_plausible(fresh, 1000.0)
    assert anchor_is_plausible(late[:1], 1000.0)  # one sample cannot contradict it


def test_gaussian_overshoot_matches_numeric_integration() -> None:
    mu, sd, lower = 500.0, 20.0, 480.0
    for t in (470.0, 490.0, 500.0, 530.0, 600.0):
        # E[(t - E)^+ | E > lower] by brute force over a fine grid of the density.
        num = den = 0.0
        step = 0.01
        x = lower
        while x < mu + 10 * sd:
            w = math.exp(-0.5 * ((x - mu) / sd) ** 2)
            den += w
            num += w * max(t - x, 0.0)
            x += step
        assert gaussian_overshoot(t, mu, sd, lower) == pytest.approx(num / den, abs=0.05)


def test_crossing_is_where_the_overshoot_reaches_theta() -> None:
    mu, sd, lower = 1000.0, 30.0, 900.0
    for theta in (0.5, 5.0, 50.0):
        t = gaussian_crossing(theta, mu, sd, lower)
        assert gaussian_overshoot(t, mu, sd, lower) == pytest.approx(theta, rel=0.05, abs=0.05)
    assert gaussian_crossing(1.0, mu, sd, 2000.0) > 2000.0  # never before the last poll


# -- state -----------------------------------------------------------------------------------------


def test_samples_are_bounded_and_keep_both_ends() -> None:
    state = ExecState("exec_a", 0.0)
    for i in range(100):
        state.add_sample(float(i), i)
    pairs = state.sample_pairs()
    assert len(pairs) == MAX_SAMPLES
    assert pairs[0] == (0.0, 0.0)
    assert pairs[-1] == (99.0, 99.0)


def test_lazy_heap_skips_stale_entries_and_compacts() -> None:
    heap = LazyHeap()
    states = [ExecState(f"exec_{i}", 0.0) for i in range(10)]
    for i, state in enumerate(states):
        heap.push(float(i), state)
    for state in states[:5]:
        state.ver += 1  # their entries are stale now
    top = heap.top()
    assert top is not None
    assert top[1] is states[5]
    for _ in range(200):
        states[9].ver += 1
        heap.push(50.0, states[9])
        heap.compact(10)
    assert len(heap) <= 2 * 10 + 64 + 1


# -- adaptive ----------------------------------------------------------------------------------------


def adaptive(n: int, rate: float = 0.5, **kwargs: float) -> tuple[AdaptivePolicy, list[ExecState]]:
    policy = AdaptivePolicy(**kwargs)
    policy.bind_rate(lambda: rate)
    return policy, [add(policy, f"exec_{i:04d}", 0.0) for i in range(n)]


def test_adaptive_floor_interval_follows_n_and_recent_leavers() -> None:
    policy, states = adaptive(100)
    assert policy.floor_interval(0.0) == pytest.approx(1.1 * 100 / 0.5)
    for state in states[:40]:
        state.live = False
        policy.remove(state, 10.0)
    # The 40 that just left still count: a cycle that began before they left had to visit them.
    assert policy.floor_interval(11.0) == pytest.approx(1.1 * 100 / 0.5)
    assert policy.floor_interval(10.0 + 221.0) == pytest.approx(1.1 * 60 / 0.5)


def test_adaptive_spends_spare_tokens_round_robin() -> None:
    policy, states = adaptive(5)
    now, seen = 10.0, []
    for _ in range(10):
        chosen = policy.choose(now)
        assert chosen is not None
        seen.append(chosen.execution_id)
        answer_running(policy, chosen, now)
        now += 2.0
    assert seen[:5] == seen[5:]
    assert sorted(seen[:5]) == [s.execution_id for s in states]


def test_adaptive_overdue_floor_goes_first() -> None:
    policy, states = adaptive(10)
    floor = policy.floor_interval(0.0)
    # Everybody answered recently except exec_0003.
    for state in states:
        if state.execution_id != "exec_0003":
            answer_running(policy, policy_take(policy, state, 1.0), floor)
    chosen = policy.choose(floor + 1.0)
    assert chosen is not None
    assert chosen.execution_id == "exec_0003"


def test_adaptive_a_stall_check_goes_before_an_overdue_floor() -> None:
    """A run crossing its stall threshold is polled then (its record is due), even while the floor
    has executions waiting: behind a floor burst, stall records came a round-robin period late."""
    policy, states = adaptive(10)
    floor = policy.floor_interval(0.0)
    crossing = states[5]
    crossing.check_at = floor + 0.5
    for state in states:
        if state.execution_id != "exec_0003":
            answer_running(policy, policy_take(policy, state, 1.0), floor)
    now = floor + 1.0 + policy.min_gap_s
    assert policy.choose(now) is crossing
    chosen = policy.choose(now)
    assert chosen is not None
    assert chosen.execution_id == "exec_0003"


def policy_take(policy: Policy, state: ExecState, now: float) -> ExecState:
    """Take a given state out of the queue as `choose` would."""
    state.ver += 1
    return state


def test_adaptive_polls_a_predicted_end_when_due() -> None:
    policy, states = adaptive(50)
    policy.floor_interval(0.0)
    target = states[7]
    # Linear progress: 100 % at 600 s; samples at 150, 300, 450 s.
    for t in (150.0, 300.0, 450.0):
        answer_running(policy, policy_take(policy, target, t), t, round(100 * t / 600))
    assert target.eta == pytest.approx(600.0, abs=5.0)
    assert 570.0 < target.due < 640.0
    # Keep everyone else fresh, then ask at the due time: the predicted end wins.
    for state in states:
        if state is not target:
            answer_running(policy, policy_take(policy, state, target.due - 1), target.due - 1)
    assert policy.choose(target.due) is target


def test_adaptive_backs_off_a_run_stuck_near_the_end() -> None:
    policy, states = adaptive(1)
    state = states[0]
    for t in (100.0, 200.0, 300.0):
        answer_running(policy, policy_take(policy, state, t), t, round(100 * t / 400))
    gaps = []
    now = state.due
    for _ in range(6):  # it says 98 % forever
        answer_running(policy, policy_take(policy, state, now), now, 98)
        gaps.append(state.due - now)
        now = state.due
    assert state.misses >= 6
    assert gaps[-1] > gaps[0] * 3  # growing gaps, not a poll every 2 s


def test_adaptive_learns_that_silent_runs_end_more_often() -> None:
    policy, states = adaptive(40)
    policy.floor_interval(0.0)
    silent, talking = states[:20], states[20:]
    for state in talking:
        answer_running(policy, policy_take(policy, state, 100.0), 100.0, 20)
    for state in silent:
        answer_running(policy, policy_take(policy, state, 100.0), 100.0, 0)
    # Ten silent runs ended (completed) at age 200 s, nobody failed: silent runs of that age look
    # risky, talking ones do not.
    for state in silent[:10]:
        state.live = False
        policy.remove(state, 200.0)
        policy.finished(state, 200.0, Outcome.COMPLETED)
    assert policy.silent_rate() > 10 * policy.unexpected_rate()
    survivor_silent, survivor_talking = silent[10], talking[0]
    answer_running(policy, policy_take(policy, survivor_silent, 200.0), 200.0, 0)
    answer_running(policy, policy_take(policy, survivor_talking, 200.0), 200.0, 40)
    assert survivor_silent.weight > 3 * survivor_talking.weight


@pytest.mark.parametrize("name", ["backoff", "adaptive"])
def test_poll_first_goes_ahead_of_everything_in_order_and_only_once(name: str) -> None:
    policy = make_policy(name)
    states = [ExecState(f"exec_{i}", 0.0) for i in range(5)]
    for state in states:
        policy.add(state, 0.0)
    policy.poll_first(states[4])
    policy.poll_first(states[3])
    assert policy.ready_at(0.0) == 0.0
    assert policy.choose(0.0) is states[4]
    assert policy.choose(0.0) is states[3]
    untracked = states[2]
    policy.poll_first(untracked)
    untracked.live = False
    policy.remove(untracked, 0.0)
    chosen = policy.choose(100.0)
    assert chosen is not untracked  # an untracked execution is skipped, not polled


def test_adaptive_learns_run_times_by_kind_and_exports_them() -> None:
    """Runs of a kind that always take 600-700 s: a silent run of that kind at 100 s is polled less
    often than one at 650 s, and a fresh policy that imports the export knows it too."""
    policy = AdaptivePolicy()
    policy.bind_rate(lambda: 0.5)
    ended = [ExecState(f"k{i}", 0.0, labels={"kind": "report"}) for i in range(30)]
    for state in ended:
        policy.add(state, 0.0)
    for i, state in enumerate(ended):
        state.last_poll = 600.0 + 3 * i
        policy.polled(state, 600.0 + 3 * i)
        state.live = False
        policy.remove(state, 600.0 + 3 * i)
        policy.finished(state, 600.0 + 3 * i, Outcome.COMPLETED)
    young, old = ExecState("y", 1000.0, labels={"kind": "report"}), ExecState("o", 400.0, labels={"kind": "report"})
    for state in (young, old):
        policy.add(state, 1000.0)
        state.last_poll = 1050.0
        policy.polled(state, 1050.0)
    assert old.weight > 3 * young.weight  # age 650 s: ends likely; age 50 s: none ever seen
    fresh = AdaptivePolicy()
    fresh.import_learning(json.loads(json.dumps(policy.export_learning())))
    table = fresh.durations.tables["report"]
    assert table.events == 30
    assert table.weight(650.0) > 3 * table.weight(50.0)


def test_a_bins_hazard_pools_its_neighbours_but_not_far_ages() -> None:
    """Two ends at about 1,000 s among 40 runs watched to 2,000 s: the bins beside that age share its
    hazard (the ends could as well have come a little earlier or later); two bins away and below,
    ages seen without an end stay near zero."""
    table = AgeTable()
    for _ in range(40):
        table.expose(0.0, 2000.0)
    table.end(1000.0)
    table.end(1010.0)
    overall = table.rate()
    at = bisect.bisect_right(EDGES, 1000.0) - 1
    here = table.hazard(at, overall)
    assert 0.5 * here < table.hazard(at + 1, overall) <= 1.5 * here
    assert 0.5 * here < table.hazard(at - 1, overall) <= 1.5 * here
    assert table.hazard(at + 2, overall) < 0.2 * here
    assert table.hazard(at - 8, overall) < 0.2 * here


# -- learning the shape of a kind's runs ----------------------------------------------------------


def test_lagging_fit_ignores_samples_below_the_line() -> None:
    """Checkpoints: samples on the line p = 100 t / D at the checkpoints, and below it where updated_at
    moved for a change of step while progress stood still. The plain fit predicts late; this one not."""
    duration = 2000.0
    on_line = [(f * duration, 100.0 * f) for f in (0.15, 0.4, 0.55)]
    lagging = [(0.3 * duration, 15.0), (0.7 * duration, 55.0)]
    samples = sorted(on_line + lagging)
    plain, robust = fit_eta_origin(samples, 0.0), fit_eta_origin_lagging(samples, 0.0)
    assert plain is not None
    assert robust is not None
    assert plain.at > 1.08 * duration
    assert robust.at == pytest.approx(duration, rel=0.01)
    clean = [(t, 100.0 * t / duration + (0.8 if i % 2 else -0.8)) for i, t in enumerate(range(100, 1000, 100))]
    assert fit_eta_origin_lagging(clean, 0.0).at == pytest.approx(duration, rel=0.01)  # type: ignore[union-attr]


def test_lagging_fit_with_the_kind_prior_keeps_weak_evidence_near_its_kind() -> None:
    """An early low sample (3 % at 100 s: a 3,300 s run, give or take a lot) against runs of its kind
    that take 2,000 s: the kind's slope prior pulls the end toward them; sharp evidence would not move."""
    prior = (100.0 / 2000.0, 0.3 * 100.0 / 2000.0)
    alone = fit_eta_origin_lagging([(100.0, 3.0)], 0.0)
    informed = fit_eta_origin_lagging([(100.0, 3.0)], 0.0, prior=prior)
    assert alone is not None
    assert informed is not None
    assert alone.at == pytest.approx(3333.3, rel=1e-3)
    assert 2000.0 < informed.at < 0.8 * alone.at
    sharp = [(t, 100.0 * t / 3300.0) for t in (500.0, 1000.0, 1500.0, 2000.0)]
    assert fit_eta_origin_lagging(sharp, 0.0, prior=prior).at == pytest.approx(3300.0, rel=0.03)  # type: ignore[union-attr]


def _curve_samples(start: float, run_s: float, shape: float, rng: random.Random) -> list[tuple[float, float]]:
    fractions = sorted(rng.uniform(0.05, 0.95) for _ in range(8))
    return [(start + f * run_s, round(100.0 * f**shape + rng.gauss(0.0, 1.0))) for f in fractions]


def test_shapes_learn_the_bend_of_a_kind() -> None:
    rng = random.Random(3)
    shapes = Shapes()
    for _ in range(Shapes.MIN_RUNS - 1):
        shapes.add_run(_curve_samples(0.0, 1000.0, 0.6, rng), 0.0, 1000.0)
    assert shapes.shape() == 1.0  # too few runs: a straight line
    for _ in range(20):
        run_s = rng.uniform(500.0, 3000.0)
        shapes.add_run(_curve_samples(50.0, run_s, 0.6, rng), 50.0, run_s)
    assert shapes.shape() == pytest.approx(0.6, abs=0.06)
    assert straighten(100.0 * 0.5**0.6, 0.6) == pytest.approx(50.0)
    assert straighten(40.0, 1.0) == 40.0
    restored = Shapes()
    restored.load(json.loads(json.dumps(shapes.export())))
    assert restored.shape() == pytest.approx(shapes.shape(), abs=1e-3)


def _run_of_kind(
    policy: AdaptivePolicy, name: str, start: float, run_s: float, shape: float, *, queue_s: float = 0.0
) -> ExecState:
    """A run tracked at `start`, queued for queue_s at 0 %, then 100 f**shape; polled at 20-50 % of its run."""
    state = ExecState(name, start, labels={"kind": "etl"})
    policy.add(state, start)
    if queue_s:
        state.progress = 0
        answer_running(policy, policy_take(policy, state, start + queue_s - 1.0), start + queue_s - 1.0, 0)
    for f in (0.2, 0.3, 0.4, 0.5):
        t = start + queue_s + f * run_s
        state.polls += 1
        state.last_poll = t
        state.progress = round(100.0 * f**shape)
        state.add_sample(t, state.progress)
        policy.polled(state, t)
    return state


def test_adaptive_straightens_the_curve_of_a_learned_kind() -> None:
    """Runs that run ahead early (progress = 100 f**0.6): a straight line predicts them far too
    early; once some runs of the kind have completed, their bend is learned and the end is right."""
    policy = AdaptivePolicy()
    policy.bind_rate(lambda: 0.5)
    naive = _run_of_kind(policy, "first", 0.0, 2000.0, 0.6)
    assert naive.eta < 0.9 * 2000.0
    for i in range(12):
        run_s = 1500.0 + 100.0 * i
        state = _run_of_kind(policy, f"done{i}", 0.0, run_s, 0.6)
        state.live = False
        policy.remove(state, run_s)
        policy.finished(state, run_s, Outcome.COMPLETED, run_s)
    later = _run_of_kind(policy, "later", 5000.0, 2000.0, 0.6)
    assert later.eta == pytest.approx(7000.0, rel=0.05)
    fresh = AdaptivePolicy()
    fresh.bind_rate(lambda: 0.5)
    fresh.import_learning(json.loads(json.dumps(policy.export_learning())))
    again = _run_of_kind(fresh, "again", 5000.0, 2000.0, 0.6)
    assert again.eta == pytest.approx(later.eta, rel=0.01)


def test_adaptive_starts_a_queued_run_after_its_last_poll_at_zero() -> None:
    """A run that waited 600 s in a queue at 0 % (its updated_at: its creation) is fitted from the last
    poll that still saw 0 %, not from when it was tracked."""
    policy = AdaptivePolicy()
    policy.bind_rate(lambda: 0.5)
    state = _run_of_kind(policy, "queued", 0.0, 2000.0, 1.0, queue_s=600.0)
    assert state.zero_at == pytest.approx(599.0)
    assert state.eta == pytest.approx(2600.0, rel=0.02)


def test_anchor_is_dropped_for_a_run_handed_over_at_a_tenth_of_its_run() -> None:
    """Started 320 s before it was tracked (a 2,400 s run): the free line's zero crossing is many of its
    standard errors before tracking, so the anchor goes; from its start it stays."""
    start, tracked = 0.0, 320.0
    samples = [
        (t, 100.0 * (t - start) / 2400.0 + (0.7 if i % 2 else -0.7)) for i, t in enumerate(range(400, 2200, 180))
    ]
    assert not anchor_is_plausible(samples, tracked)
    assert anchor_is_plausible(samples, start)
    assert anchor_is_plausible(samples, start + 20.0)  # the clocks' slack


def test_adaptive_weighs_a_run_with_little_progress_like_the_runs_with_progress() -> None:
    """Progress below the least for a prediction (5 %): no eta yet, but it is early in its run; its
    round-robin weight is the rate of unannounced ends, not the (much higher) end rate of silent runs."""
    policy, states = adaptive(20)
    for state in states[:10]:
        answer_running(policy, policy_take(policy, state, 100.0), 100.0)
        state.live = False
        policy.remove(state, 100.0)
        policy.finished(state, 100.0, Outcome.COMPLETED)
    early, silent = states[10], states[11]
    early.progress = 5
    answer_running(policy, policy_take(policy, early, 150.0), 150.0, 5)
    answer_running(policy, policy_take(policy, silent, 150.0), 150.0, 0)
    assert math.isinf(early.eta)
    assert early.weight == pytest.approx(math.sqrt(policy.unexpected_rate()), rel=0.02)
    assert silent.weight > 2 * early.weight
