"""The ratio controller and the serving simulator, on synthetic measured numbers (no TVM)."""
import numpy as np
import pytest

from flexiq_tvm.serving import (ControllerError, RatioController, ServiceTimes, poisson_trace, simulate, summarize,
                                swing_trace)
from flexiq_tvm.serving.sim import swing_rate

LEVELS = [0.0, 0.25, 0.5, 0.75, 1.0]
SLO = 0.020
B = 8


def svc(lv, b):
    """Synthetic accelerator: 1 ms + 0.5 ms per sample at INT8; all-4-bit 40% faster (linear in ratio)."""
    return (1e-3 + 0.5e-3 * b) * (1 - 0.4 * LEVELS[lv])


def capacity(lv):
    return B / svc(lv, B)


def measured(**kw):
    c = RatioController(LEVELS, SLO, max_batch=B, **kw)
    for lv in range(len(LEVELS)):
        for b in (1, B):
            c.observe(lv, b, svc(lv, b))
    return c


def test_rising_load_raises_ratio_at_once():
    c = measured()
    seen = []
    for k, q in enumerate([1, 4, 8, 16, 24, 32, 40, 48]):
        seen.append(c.decide(q, 0.002 * k, now=0.001 * k))
    assert seen[0] == 0.0                                  # light load: INT8
    assert all(b >= a for a, b in zip(seen, seen[1:]))     # never lowers while load rises
    assert seen[-1] == 1.0                                 # the deepest queue needs all-4-bit
    # the choice is the lowest level whose prediction fits: every lower level misses the bound
    lv = c.level_index(seen[4])
    assert c.predict(lv, 24, 0.008) <= c.headroom * SLO
    assert lv == 0 or c.predict(lv - 1, 24, 0.008) > c.headroom * SLO


def test_falling_load_lowers_only_after_hysteresis_window():
    c = measured(down_after=5, down_hold_s=0.05)
    assert c.decide(48, 0.004, now=0.0) == 1.0
    t, ratios = 0.0, []
    for _ in range(20):
        t += 0.005
        ratios.append(c.decide(1, 0.0, now=t))
    first_low = next(i for i, r in enumerate(ratios) if r < 1.0)
    # needs >= 5 qualifying decisions spanning >= 50 ms since the first one (at t = 5 ms)
    assert first_low >= 4 and 0.005 * (first_low + 1) - 0.005 >= 0.05 - 1e-9
    assert ratios[first_low] == 0.0 and ratios[-1] == 0.0
    # a burst in the middle of the window resets it
    c2 = measured(down_after=3, down_hold_s=0.0)
    c2.decide(48, 0.004, now=0.0)
    c2.decide(1, 0.0, now=0.01)
    c2.decide(1, 0.0, now=0.02)
    assert c2.decide(48, 0.004, now=0.03) == 1.0
    assert c2.decide(1, 0.0, now=0.04) == 1.0 and c2.decide(1, 0.0, now=0.05) == 1.0
    assert c2.decide(1, 0.0, now=0.06) == 0.0


def test_no_oscillation_under_steady_load_and_hysteresis_is_what_prevents_it():
    rate = 0.5 * (capacity(0) + capacity(1))            # between INT8's and ratio 0.25's capacity
    arr = poisson_trace(rate, 20000, seed=3)
    with_h = simulate(arr, svc, B, 0.002, controller=measured())
    no_h = simulate(arr, svc, B, 0.002, controller=measured(down_after=1, down_hold_s=0.0, down_headroom=0.8,
                                                               down_utilization=0.97))
    assert with_h.switches <= 10, with_h.switches
    assert no_h.switches > 5 * max(with_h.switches, 1)    # without the band and the dwell it flips


def test_slo_respected_in_simulated_queue():
    acc = {r: 0.90 - 0.02 * r for r in LEVELS}
    rate = 0.5 * (capacity(0) + capacity(len(LEVELS) - 1))  # INT8 overloaded, all-4-bit not
    assert capacity(0) < rate < capacity(len(LEVELS) - 1)
    arr = poisson_trace(rate, 20000, seed=1)
    int8 = summarize(simulate(arr, svc, B, 0.002, static_level=0), SLO, LEVELS, acc)
    adapt = summarize(simulate(arr, svc, B, 0.002, controller=measured()), SLO, LEVELS, acc)
    assert int8["p90_ms"] > 5 * SLO * 1e3                 # the unstable queue blows past the SLO
    assert adapt["p90_ms"] <= SLO * 1e3 and adapt["slo_attainment"] >= 0.9
    assert 0.88 <= adapt["accuracy_served"] < 0.90        # paid some accuracy, only what was needed
    # under light load the adaptive model is the INT8 model
    light = summarize(simulate(poisson_trace(0.3 * capacity(0), 5000, 2), svc, B, 0.002, controller=measured()),
                      SLO, LEVELS, acc)
    assert light["served_share"]["0.0"] > 0.99 and light["accuracy_served"] > 0.8999


def test_steady_state_prediction_tracks_the_simulated_queue():
    """steady_p90 (Kingman, a full batch as the job) against the p90 the simulator measures for the
    same level under the same Poisson load: within 25% where it matters, near saturation."""
    c = measured(max_wait_s=0.002)
    for util in (0.8, 0.91, 0.95):
        rate = util * capacity(2)
        sim = summarize(simulate(poisson_trace(rate, 40000, seed=5), svc, B, 0.002, static_level=2), SLO, LEVELS)
        pred = c.steady_p90(2, rate) * 1e3
        assert abs(pred - sim["p90_ms"]) <= 0.25 * sim["p90_ms"], (util, pred, sim["p90_ms"])
    assert c.steady_p90(2, 1.01 * capacity(2)) == float("inf")
    # the batch-forming wait is bounded by the loop's max_wait_s: a trickle does not look slow
    assert c.steady_p90(0, 1.0) <= svc(0, B) + 0.002 + 1e-5


def test_near_saturation_takes_the_lowest_level_that_keeps_up():
    """88% of ratio 0.75's capacity with a loose SLO: 0.75 serves within it, so the controller must
    not pay all-4-bit's accuracy; a fixed 80-90% utilisation cap (the old policy) did."""
    rate = 0.88 * capacity(3)
    assert rate > capacity(2)                               # 0.5 cannot keep up
    arr = poisson_trace(rate, 20000, seed=4)
    adapt = summarize(simulate(arr, svc, B, 0.002, controller=measured(max_wait_s=0.002)), SLO, LEVELS)
    assert adapt["p90_ms"] <= SLO * 1e3
    assert adapt["served_share"]["0.75"] > 0.8 and adapt["served_share"]["1.0"] < 0.15, adapt["served_share"]
    capped = summarize(simulate(arr, svc, B, 0.002, controller=measured(max_wait_s=0.002, max_utilization=0.9,
                                                                        down_utilization=0.8)), SLO, LEVELS)
    assert capped["served_share"]["1.0"] > 0.8


def test_swing_trace_adaptive_vs_int8():
    low, high = 0.5 * capacity(0), 0.5 * (capacity(0) + capacity(len(LEVELS) - 1))
    arr = swing_trace(low, high, period_s=2.0, duration_s=8.0, seed=0)
    acc = {r: 0.90 - 0.02 * r for r in LEVELS}
    res = simulate(arr, svc, B, 0.002, controller=measured())
    adapt = summarize(res, SLO, LEVELS, acc)
    int8 = summarize(simulate(arr, svc, B, 0.002, static_level=0), SLO, LEVELS, acc)
    assert adapt["p90_ms"] <= SLO * 1e3 < int8["p90_ms"]
    lv = np.array(res.batch_level)
    ts = np.array(res.batch_start)
    low_phase = swing_rate(ts, low, high, 2.0) == low
    assert lv[low_phase].mean() < lv[~low_phase].mean()   # the ratio follows the load


def test_unmeasured_levels_are_not_assumed_faster():
    c = RatioController(LEVELS, SLO, max_batch=B)
    assert c.times.estimate(3, 4) is None and c.predict(0, 4, 0.0) is None
    c.observe(0, 1, 0.002)
    c.observe(0, 8, 0.006)
    assert c.times.estimate(4, 8) == pytest.approx(0.006)      # borrowed from INT8, not invented
    assert c.times.estimate(0, 4) == pytest.approx(0.002 + 0.004 * 3 / 7)
    assert c.times.estimate(0, 16) == pytest.approx(0.012)
    # overloaded with only INT8 measured: it goes to the top level (and so measures it)
    assert c.decide(100, 0.05, now=0.0) == 1.0


def test_pin_and_bad_inputs():
    c = measured()
    c.pin(0.5)
    assert c.decide(100, 1.0, now=0.0) == 0.5 and c.decide(0, 0.0, now=1.0) == 0.5
    c.pin(None)
    assert c.decide(100, 1.0, now=2.0) == 1.0
    with pytest.raises(ControllerError, match="not one of the served levels"):
        c.pin(0.3)
    with pytest.raises(ControllerError, match="slo_s"):
        RatioController(LEVELS, 0.0)
    with pytest.raises(ControllerError, match="outside"):
        RatioController([0.0, 1.5], 0.05)
    with pytest.raises(ControllerError, match="hysteresis"):
        RatioController(LEVELS, 0.05, headroom=0.5, down_headroom=0.8)
    with pytest.raises(ControllerError, match="service time"):
        ServiceTimes(2).observe(0, 1, float("nan"))
    with pytest.raises(ControllerError, match="queue state"):
        c.decide(-1, 0.0, now=0.0)


def test_traces_are_seeded():
    a, b = poisson_trace(100.0, 1000, seed=7), poisson_trace(100.0, 1000, seed=7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, poisson_trace(100.0, 1000, seed=8))
    assert abs(1000 / a[-1] - 100.0) < 10
    s = swing_trace(100.0, 400.0, period_s=10.0, duration_s=40.0, seed=0)
    first_half, second_half = np.sum(s < 5.0), np.sum((s >= 5.0) & (s < 10.0))
    assert 350 < first_half < 650 and 1700 < second_half < 2300      # low then high
    assert np.all(np.diff(s) >= 0)


def test_overload_where_4bit_is_no_faster_keeps_int8():
    """On a target whose ratios all run at one speed (the CPU), raising the ratio buys nothing:
    an overloaded queue must not cost accuracy."""
    c = RatioController(LEVELS, SLO, max_batch=B)
    for lv in range(len(LEVELS)):
        for b in (1, B):
            c.observe(lv, b, svc(0, b) * (1 + 0.001 * lv))     # equal within noise
    assert c.decide(200, 0.5, now=0.0) == 0.0
    c2 = measured()                                             # where 4-bit is faster, overload -> top
    assert c2.decide(200, 0.5, now=0.0) == 1.0
