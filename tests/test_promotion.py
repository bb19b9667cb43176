"""Promotion verdicts, Holm-adjusted p-values and the noise floor, on hand-checked fold scores.

Every case uses k = 5 folds of n_train = 400 and n_test = 100 images, so the Nadeau-Bengio
variance factor is 1/k + n_test/n_train = 0.2 + 0.25 = 0.45. Student t quantiles with 4 degrees
of freedom, from printed tables: t_0.95 = 2.131847, t_0.975 = 2.776445, t_0.80 = 0.940965.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from imgcls.evaluation.metrics import compare_to_best
from imgcls.selection.noisefloor import NoiseFloor, closer_than_floor, noise_floor
from imgcls.selection.promotion import Verdict, decide_promotion, holm, with_holm

N_TRAIN, N_TEST = 400, 100
T95, T975, T80 = 2.131847, 2.776445, 0.940965  # t quantiles, 4 degrees of freedom
INCUMBENT = [0.90, 0.91, 0.92, 0.90, 0.91]
# d = [0.02, 0.03, 0.01, 0.02, 0.02]: mean 0.02; squared deviations 0, 1e-4, 1e-4, 0, 0, so
# var(d, ddof=1) = 2e-4 / 4 = 5e-5; se = sqrt(0.45 * 5e-5) = sqrt(2.25e-5) = 0.00474342;
# half width t_0.95 * se = 2.131847 * 0.00474342 = 0.0101122.
BETTER = [0.92, 0.94, 0.93, 0.92, 0.93]
SE, HALF = math.sqrt(2.25e-5), T95 * math.sqrt(2.25e-5)


def decide(challenger, incumbent, rope=0.005, alpha=0.05, costs=((10.0, 2.0), (30.0, 2.0))):
    return decide_promotion(challenger, incumbent, N_TRAIN, N_TEST, rope, alpha, *costs)


def test_promote_when_the_interval_lies_above_the_rope():
    verdict = decide(BETTER, INCUMBENT)
    # interval 0.02 -+ 0.0101122 = [0.0098878, 0.0301122], above +0.005.
    # t = (0.02 - 0.005) / 0.00474342 = 3.16228 (= sqrt(10)); one-sided p for 4 df in closed form:
    # 1 - F(x) with F(x) = 1/2 + 3/8 * x / sqrt(1 + x^2/4) * (1 - x^2 / (12 (1 + x^2/4)))
    # = 1 - (0.5 + 0.375 * 1.690309 * 0.761905) = 0.017055 < alpha.
    assert verdict.verdict is Verdict.PROMOTE and verdict.promoted
    assert verdict.mean_difference == pytest.approx(0.02, abs=1e-12)
    assert (verdict.ci_low, verdict.ci_high) == pytest.approx((0.0098878, 0.0301122), abs=1e-7)
    assert verdict.t == pytest.approx(math.sqrt(10), rel=1e-9)
    assert verdict.p_value == pytest.approx(0.017055, abs=1e-6)
    # two-sided corrected test of "difference != 0": t = 0.02 / 0.00474342 = 4.21637
    assert verdict.t_difference == pytest.approx(0.02 / SE, rel=1e-9)
    assert (verdict.k, verdict.confidence, verdict.rope, verdict.alpha) == (5, 0.9, 0.005, 0.05)
    assert verdict.fold_differences == pytest.approx((0.02, 0.03, 0.01, 0.02, 0.02), abs=1e-12)
    assert verdict.reason.startswith("PROMOTE: the challenger is better by more than the rope")
    assert verdict.reason.endswith(
        "+2.00 points, 90% interval [+0.99, +3.01] over 5 folds, rope 0.50 points, "
        "one-sided p 0.0171 for a gain above the rope."
    )


def test_keep_when_the_challenger_is_worse():
    verdict = decide(INCUMBENT, BETTER)
    # d = -[0.02, 0.03, 0.01, 0.02, 0.02]: interval [-0.0301122, -0.0098878], below -rope;
    # t = (-0.02 - 0.005) / 0.00474342 = -5.27046, p = 1 - 0.0017 (t_0.9983 ~ 5.27 for 4 df).
    assert verdict.verdict is Verdict.KEEP and not verdict.promoted
    assert (verdict.ci_low, verdict.ci_high) == pytest.approx((-0.0301122, -0.0098878), abs=1e-7)
    assert verdict.t == pytest.approx(-0.025 / SE, rel=1e-9)
    assert verdict.p_value > 0.99
    assert "worse by more than the rope" in verdict.reason


def test_keep_when_not_better_by_more_than_the_rope():
    # d = [-0.01, -0.02, 0.00, -0.01, -0.01]: mean -0.01, var 5e-5 as above, so the interval is
    # -0.01 -+ 0.0101122 = [-0.0201122, 0.0001122]: its upper end is below +rope, not below -rope.
    challenger = [0.89, 0.89, 0.92, 0.89, 0.90]
    verdict = decide(challenger, INCUMBENT)
    assert verdict.verdict is Verdict.KEEP
    assert (verdict.ci_low, verdict.ci_high) == pytest.approx((-0.0201122, 0.0001122), abs=1e-7)
    assert "not better by more than the rope" in verdict.reason


def test_keep_when_the_interval_is_too_wide():
    # d = [0.05, -0.03, 0.02, 0.00, 0.01]: mean 0.01; squared deviations 16e-4, 16e-4, 1e-4, 1e-4,
    # 0 -> var 34e-4 / 4 = 8.5e-4; se = sqrt(0.45 * 8.5e-4) = 0.0195576; half = 0.0416938;
    # interval [-0.0316938, 0.0516938] holds +rope: no evidence either way.
    challenger = [0.95, 0.88, 0.94, 0.90, 0.92]
    verdict = decide(challenger, INCUMBENT)
    assert verdict.verdict is Verdict.KEEP
    assert (verdict.ci_low, verdict.ci_high) == pytest.approx((-0.0316938, 0.0516938), abs=1e-6)
    assert verdict.p_value > 0.05
    assert "too wide" in verdict.reason


# d = [0.001, 0.002, 0.000, 0.001, 0.001]: mean 0.001, var (1e-6 + 1e-6) / 4 = 5e-7,
# se = sqrt(0.45 * 5e-7) = 4.74342e-4, half = 1.011224e-3: interval [-1.1224e-5, 2.011224e-3],
# inside [-0.005, 0.005]. TOST p = sf((0.005 - 0.001) / se = 8.43274, 4 df) < 0.002.
EQ_INCUMBENT = [0.950, 0.960, 0.955, 0.950, 0.965]
EQ_CHALLENGER = [0.951, 0.962, 0.955, 0.951, 0.966]


def test_equivalent_and_cheaper_wins_on_training_time_first():
    # cheaper in training seconds (12 < 30) although slower per image (3.0 > 2.0): lexicographic
    verdict = decide(EQ_CHALLENGER, EQ_INCUMBENT, costs=((12.0, 3.0), (30.0, 2.0)))
    assert verdict.verdict is Verdict.EQUIVALENT_CHEAPER and verdict.promoted
    assert (verdict.ci_low, verdict.ci_high) == pytest.approx((-1.1224e-5, 2.011224e-3), abs=1e-8)
    assert verdict.p_equivalence < 0.002 and verdict.challenger_cheaper is True
    assert "equivalent within the rope and cheaper" in verdict.reason
    assert "training 12.0 s vs 30.0 s" in verdict.reason
    # equal training seconds: the latency decides
    tie = decide(EQ_CHALLENGER, EQ_INCUMBENT, costs=((30.0, 1.5), (30.0, 2.0)))
    assert tie.verdict is Verdict.EQUIVALENT_CHEAPER


def test_equivalent_but_not_cheaper_or_cost_unknown_keeps_the_incumbent():
    dearer = decide(EQ_CHALLENGER, EQ_INCUMBENT, costs=((30.0, 2.5), (30.0, 2.0)))
    assert dearer.verdict is Verdict.KEEP and dearer.challenger_cheaper is False
    assert "equivalent within the rope but not cheaper" in dearer.reason
    equal = decide(EQ_CHALLENGER, EQ_INCUMBENT, costs=((30.0, 2.0), (30.0, 2.0)))
    assert equal.verdict is Verdict.KEEP
    unknown = decide(EQ_CHALLENGER, EQ_INCUMBENT, costs=((math.nan, 1.0), (30.0, 2.0)))
    assert unknown.verdict is Verdict.KEEP and unknown.challenger_cheaper is None
    assert "a cost is unknown" in unknown.reason
    no_costs = decide_promotion(EQ_CHALLENGER, EQ_INCUMBENT, N_TRAIN, N_TEST)
    assert no_costs.verdict is Verdict.KEEP and "costs unknown" in no_costs.reason


def test_no_incumbent_promotes():
    verdict = decide_promotion(BETTER, None, N_TRAIN, N_TEST, challenger_cost=(5.0, 1.0))
    assert verdict.verdict is Verdict.PROMOTE
    assert verdict.reason == "PROMOTE: no previous champion"
    assert math.isnan(verdict.mean_difference) and math.isnan(verdict.p_value)
    assert verdict.k == 5 and verdict.incumbent_cost is None


def test_a_difference_exactly_at_the_rope_is_equivalent_not_better():
    incumbent = [0.90, 0.91, 0.92, 0.93, 0.94]
    # Every fold differs by +0.005 (to float noise, ~1e-17): zero variance, the interval is the
    # single point 0.005 = +rope. Not above the rope, so not PROMOTE; inside [-rope, +rope].
    at_rope = [s + 0.005 for s in incumbent]
    verdict = decide(at_rope, incumbent)
    assert verdict.verdict is Verdict.EQUIVALENT_CHEAPER
    assert verdict.ci_low == verdict.ci_high == pytest.approx(0.005, abs=1e-15)
    assert (verdict.t, verdict.p_value) == (0.0, 0.5)
    # the same at -rope
    below = decide([s - 0.005 for s in incumbent], incumbent)
    assert below.verdict is Verdict.EQUIVALENT_CHEAPER
    # a rope just below the difference: the whole (zero-width) interval lies above it
    above = decide(at_rope, incumbent, rope=0.0049)
    assert above.verdict is Verdict.PROMOTE and (above.t, above.p_value) == (math.inf, 0.0)


@pytest.mark.parametrize(("shift", "expected"), [(1e-5, Verdict.PROMOTE), (-1e-5, Verdict.KEEP)])
def test_promotion_flips_where_the_lower_end_crosses_the_rope(shift, expected):
    # d = [0, 0.01, -0.01, 0, 0] + c: var 5e-5 as above, half 0.0101122; the lower end c - half
    # lies at rope + shift when c = 0.005 + 0.0101122 + shift.
    c = 0.005 + HALF + shift
    incumbent = [0.5] * 5
    challenger = [0.5 + c + e for e in (0.0, 0.01, -0.01, 0.0, 0.0)]
    verdict = decide(challenger, incumbent)
    assert verdict.ci_low == pytest.approx(0.005 + shift, abs=1e-8)  # t_0.95 to 6 digits
    assert verdict.verdict is expected
    assert (verdict.p_value < 0.05) is (expected is Verdict.PROMOTE)


def test_inputs_that_are_not_paired_fold_fractions_are_refused():
    with pytest.raises(ValueError, match=r"challenger has 5 fold scores but the incumbent 4.*same"):
        decide(BETTER, INCUMBENT[:4])
    with pytest.raises(ValueError, match=r"incumbent score of fold 1 is 91\.0.*fractions"):
        decide(BETTER, [0.9, 91.0, 0.92, 0.9, 0.91])
    with pytest.raises(ValueError, match="challenger score of fold 0 is nan"):
        decide([math.nan, *BETTER[1:]], INCUMBENT)
    with pytest.raises(ValueError, match="at least 2 folds"):
        decide([0.9], [0.8])
    with pytest.raises(ValueError, match="rope must be a fraction"):
        decide(BETTER, INCUMBENT, rope=1.0)
    with pytest.raises(ValueError, match="alpha must lie in"):
        decide(BETTER, INCUMBENT, alpha=0.5)
    with pytest.raises(ValueError, match="challenger cost must be"):
        decide(BETTER, INCUMBENT, costs=((1.0,), (1.0, 2.0)))


def test_a_verdict_serialises_to_json():
    record = decide(BETTER, INCUMBENT).as_dict()
    text = json.dumps(record)
    assert json.loads(text)["verdict"] == "PROMOTE"
    assert record["challenger_cost"] == [10.0, 2.0]
    assert set(record) >= {"mean_difference", "ci_low", "ci_high", "t", "p_value", "rope", "k"}


def test_holm_matches_the_hand_computed_step_down_values():
    # sorted: d 0.005 (x4 = 0.02), a 0.01 (x3 = 0.03), c 0.03 (x2 = 0.06), b 0.04 (x1 = 0.04,
    # raised to 0.06 to stay monotone); statsmodels' multipletests(method="holm") gives the same.
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005})
    assert list(adjusted) == ["a", "b", "c", "d"]
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06, "d": 0.02}, abs=1e-15)
    # NaN stays NaN and is not counted in m
    with_nan = holm({"a": 0.01, "best": math.nan, "b": 0.04, "c": 0.03, "d": 0.005})
    assert math.isnan(with_nan.pop("best"))
    assert with_nan == pytest.approx(adjusted, abs=1e-15)
    # capped at 1: 2 * 0.5 = 1.0, then max(1.0, 0.6) = 1.0
    assert holm({"a": 0.5, "b": 0.6}) == {"a": 1.0, "b": 1.0}
    assert holm({}) == {}
    with pytest.raises(ValueError, match=r"p-value of 'x' is 1\.5"):
        holm({"x": 1.5})


def test_with_holm_adds_adjusted_p_values_to_a_comparison_table():
    scores = {
        "best": [0.95, 0.96, 0.97, 0.95, 0.96],
        "a": [0.93, 0.95, 0.94, 0.94, 0.95],
        "b": [0.94, 0.96, 0.96, 0.95, 0.95],
    }
    table = with_holm(compare_to_best(scores, "best", N_TRAIN, N_TEST))
    raw = table["p_value"]
    assert math.isnan(table.loc["best", "p_holm"])
    smaller, larger = sorted(["a", "b"], key=lambda n: raw[n])
    assert table.loc[smaller, "p_holm"] == pytest.approx(min(1.0, 2 * raw[smaller]))
    assert table.loc[larger, "p_holm"] == pytest.approx(max(2 * raw[smaller], raw[larger]))
    with pytest.raises(KeyError, match="no column 'p'"):
        with_holm(pd.DataFrame({"x": [1.0]}), column="p")


FOLDS = [0.90, 0.92, 0.94, 0.96, 0.98]


def test_noise_floor_from_the_fold_spread():
    # mean 0.94; squared deviations 16e-4, 4e-4, 0, 4e-4, 16e-4 -> var 40e-4 / 4 = 1e-3, sd
    # 0.0316228; paired-difference variance 2 * 1e-3 = 2e-3; sqrt(0.45 * 2e-3) = 0.03;
    # mdd = (t_0.975 + t_0.80) * 0.03 = (2.776445 + 0.940965) * 0.03 = 0.1115223.
    floor = noise_floor(None, FOLDS, N_TRAIN, N_TEST)
    assert floor.source == "folds" and (floor.n_runs, floor.k) == (5, 5)
    assert floor.run_sd == pytest.approx(math.sqrt(1e-3), rel=1e-12)
    assert floor.difference_sd == pytest.approx(math.sqrt(2e-3), rel=1e-12)
    assert floor.min_detectable_difference == pytest.approx((T975 + T80) * 0.03, abs=1e-7)
    assert floor.min_detectable_difference == pytest.approx(0.1115223, abs=1e-7)


def test_noise_floor_from_seeds_and_the_points_closer_than_it():
    # 3 seeds x 5 folds; every fold's three scores are f - 0.01, f, f + 0.01: within-fold
    # variance 1e-4 in each fold, pooled sd 0.01 (the fold-to-fold spread of FOLDS drops out);
    # sqrt(0.45 * 2e-4) = 0.00948683; mdd = 3.717410 * 0.00948683 = 0.0352664.
    seeds = [[f + d for f in FOLDS] for d in (-0.01, 0.0, 0.01)]
    floor = noise_floor(seeds, FOLDS, N_TRAIN, N_TEST)
    assert floor.source == "seeds" and (floor.n_runs, floor.k) == (3, 5)
    assert floor.run_sd == pytest.approx(0.01, rel=1e-12)
    assert floor.min_detectable_difference == pytest.approx(0.0352664, abs=1e-6)
    points = {"a": 0.9926, "champ": 0.9989, "b": 0.9980, "c": 0.95, "d": math.nan}
    # gaps: b 0.0009, a 0.0063, c 0.0489 (> 0.0353); d has no score
    assert floor.closer_than_floor(points, "champ") == ["b", "a"]
    assert closer_than_floor(points, "champ", 0.0063 + 1e-9) == ["b", "a"]
    assert closer_than_floor({"champ": 0.5, "x": 0.25}, "champ", 0.25) == []  # strict <
    with pytest.raises(ValueError, match="champion 'z' is not among"):
        closer_than_floor(points, "z", floor)
    assert isinstance(floor, NoiseFloor)


def test_noise_floor_refuses_what_it_cannot_estimate():
    with pytest.raises(ValueError, match="at least 2 seed repetitions"):
        noise_floor([FOLDS], FOLDS, N_TRAIN, N_TEST)
    with pytest.raises(ValueError, match=r"\[repetitions >= 2, 5 folds\], got shape \(2, 4\)"):
        noise_floor([FOLDS[:4], FOLDS[:4]], FOLDS, N_TRAIN, N_TEST)
    with pytest.raises(ValueError, match="seed score of fold 0 is 95"):
        noise_floor([[95.0] * 5, FOLDS], FOLDS, N_TRAIN, N_TEST)
    with pytest.raises(ValueError, match="at least 2 folds"):
        noise_floor(None, [0.9], N_TRAIN, N_TEST)
    with pytest.raises(ValueError, match="power"):
        noise_floor(None, FOLDS, N_TRAIN, N_TEST, power=1.0)
    assert noise_floor([], FOLDS, N_TRAIN, N_TEST).source == "folds"
