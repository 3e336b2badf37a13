"""`--budget auto` over (β, precision) on synthetic candidates: the documented rule
(flexrank.device.decide), each user constraint, and the unmeetable target.

The candidates' figures are round numbers, so each expected winner follows by hand from
the rule: fit every target; best perplexity; within the tolerance, the smallest."""

from __future__ import annotations

import json

import pytest
import yaml

from flexrank.device.decide import Candidate, Constraints, Quality, decide
from flexrank.device.predict import Efficiency
from flexrank.device.profiles import parse_profile
from flexrank.device_profiles import PROFILE_DIR
from flexrank.planning.costs import BudgetCost

# Effective bandwidth 5 GB/s and compute 50 GFLOP/s on the profile below, no overhead:
# a candidate reading B bytes per token decodes at 5e9 / B tokens/s.
FLAT = Efficiency(bandwidth=0.5, compute=0.5, overhead_per_layer_s=0.0, source="test")


def profile(runtime="onnxruntime", download_mb=None, memory_gb=2.5, decode=20.0, ttft=1.0,
            also_runs=()):
    raw = yaml.safe_load((PROFILE_DIR / "pixel8.yaml").read_text())
    raw.update(name="synthetic", runtime=runtime,
               backend="cpu" if runtime == "onnxruntime" else "xnnpack", context_tokens=64)
    raw["also_runs"] = [{"runtime": r, "backend": "cpu" if r == "onnxruntime" else "xnnpack",
                         "source": "test"} for r in also_runs]
    raw["compute_gflops"]["value"] = 100.0
    raw["memory_bandwidth_gbps"]["value"] = 10.0
    raw["model_memory_gb"]["value"] = memory_gb
    raw["targets"] = {"decode_tokens_per_s": decode, "ttft_s": ttft, "prompt_tokens": 64}
    raw.pop("download_limit_mb", None)
    if download_mb is not None:
        raw["download_limit_mb"] = {"value": download_mb, "unit": "MB",
                                    "source": "test: a store's download limit"}
    return parse_profile(raw, "synthetic.yaml")


def candidate(beta, precision, size_mb, ppl, flops=1e6):
    """Weights of `size_mb` MB read once per token (no KV cache): decode = 5000 / size_mb
    tokens/s; memory = size_mb / 1000 GB; TTFT = 64 × flops / 50 GFLOP/s."""
    size = size_mb * 1e6
    cost = BudgetCost(beta=beta, flops_per_token=flops, weight_bytes_per_token=size,
                      weight_bytes_total=size, kv_bytes_per_token=0.0, n_layers=30)
    return Candidate(cost, precision, Quality(ppl=ppl, kl=(ppl - 40) / 100))


# A 135M-like model: fp32 540 MB at β 1; int8 a quarter; int4 5/32 (blocks of 32, fp32 scale).
SIZES = {"fp32": 540.0, "int8": 135.0, "int4": 84.4}
PPL = {(1.0, "fp32"): 44.0, (1.0, "int8"): 44.3, (1.0, "int4"): 47.0,
       (0.8, "fp32"): 52.0, (0.8, "int8"): 52.4, (0.8, "int4"): 56.0,
       (0.6, "fp32"): 70.0, (0.6, "int8"): 70.5, (0.6, "int4"): 76.0}


def grid(precisions=("fp32", "int8", "int4")):
    return [candidate(beta, prec, SIZES[prec] * (0.3 + 0.7 * beta), PPL[beta, prec])
            for beta in (1.0, 0.8, 0.6) for prec in precisions]


def chosen(decision):
    return None if decision.chosen is None else (decision.beta, decision.precision)


def test_best_quality_then_smallest_within_the_tolerance():
    # All fit once decode only needs 5 tok/s (fp32 β 1 decodes at 5000 / 540 = 9.3).
    decision = decide(grid(), profile(decode=5.0), efficiency=FLAT)
    # best: β 1 fp32 (44.0); β 1 int8 (44.3) is within 1 % (≤ 44.44) and 4x smaller
    assert chosen(decision) == (1.0, "int8")
    assert "best quality among them is β 1 fp32 (ppl 44" in decision.explanation
    assert "within the 0.01 quality tolerance" in decision.explanation
    # no tolerance: the best quality itself
    strict = decide(grid(), profile(decode=5.0), Constraints(quality_tolerance=0.0), FLAT)
    assert chosen(strict) == (1.0, "fp32")
    # a wide tolerance (30 %) lets the 4-bit β 0.8 (56.0 ≤ 57.2) in: the smallest wins
    wide = decide(grid(), profile(decode=5.0), Constraints(quality_tolerance=0.3), FLAT)
    assert chosen(wide) == (0.8, "int4")


def test_lower_precision_at_a_higher_beta_beats_higher_precision_at_a_lower_beta():
    # 100 MB download limit: fp32 fits at no β (≥ 259 MB), int8 only at β 0.6 (89 MB),
    # int4 at every β. β 1 int4 (ppl 47.0) beats β 0.6 int8 (70.5), though int8 is the
    # higher precision, and β 0.8 int4 (56.0) too, though it is smaller.
    decision = decide(grid(), profile(download_mb=100.0), efficiency=FLAT)
    fits = {(r.beta, r.precision) for r in decision.rows if r.fits}
    assert fits == {(0.6, "int8"), (1.0, "int4"), (0.8, "int4"), (0.6, "int4")}
    assert chosen(decision) == (1.0, "int4")
    assert "Better quality that does not fit: β 1 fp32 (ppl 44" in decision.explanation
    assert "size 540 MB > target 100 MB (+440 %)" in decision.explanation


@pytest.mark.parametrize("constraint, expected, why", [
    (Constraints(), (1.0, "int8"), "none: β 1 int8 is within 1 % of β 1 fp32"),
    (Constraints(max_size_mb=100.0), (1.0, "int4"), "only 4-bit fits 100 MB at β 1"),
    (Constraints(max_size_mb=65.0), (0.6, "int4"), "65 MB: only β 0.6 int4 (60.8 MB)"),
    (Constraints(max_memory_gb=0.1), (1.0, "int4"), "0.1 GB: int8 β 1 (135 MB) is out"),
    (Constraints(min_decode_tokens_per_s=50.0), (0.8, "int4"),
     "≥ 50 tok/s: ≤ 100 MB read per token; β 1 int4 is 84.4 MB -> 59 tok/s ... fits"),
    (Constraints(max_ttft_s=0.5), (0.6, "int8"), "TTFT: only the cheap-FLOP candidates"),
])
def test_each_user_constraint_changes_the_decision(constraint, expected, why):
    cands = grid()
    if constraint.max_ttft_s:  # β 0.6 costs 3x fewer FLOPs in this variant: TTFT 0.38 s
        cands = [candidate(c.beta, c.precision, c.size_mb, c.quality.ppl,
                           flops=3e8 if c.beta == 0.6 else 1e9) for c in cands]
    if constraint.min_decode_tokens_per_s:  # β 1 int4 made slow: reads 120 MB per token
        cands = [c if (c.beta, c.precision) != (1.0, "int4") else
                 candidate(1.0, "int4", 120.0, c.quality.ppl) for c in cands]
    decision = decide(cands, profile(decode=5.0), constraint, FLAT)
    assert chosen(decision) == expected, why
    given = {k: v for k, v in vars(constraint).items() if v and k != "quality_tolerance"}
    if given:  # the table names the user's flag as the target's source
        flag = {"max_size_mb": "--max-size", "max_memory_gb": "--max-memory",
                "min_decode_tokens_per_s": "--min-decode", "max_ttft_s": "--max-ttft"}
        assert f"({flag[next(iter(given))]})" in decision.table()


def test_user_constraint_replaces_the_profiles_limit():
    # the profile allows 100 MB; --max-size 600 lifts it: fp32 β 1 is back, int8 within 1 %
    tight = decide(grid(), profile(download_mb=100.0, decode=5.0), efficiency=FLAT)
    loose = decide(grid(), profile(download_mb=100.0, decode=5.0), Constraints(max_size_mb=600),
                   FLAT)
    assert chosen(tight) == (1.0, "int4") and chosen(loose) == (1.0, "int8")
    assert loose.limits["size"].source == "--max-size"
    assert tight.limits["size"].source == "profile synthetic"


def test_an_unmeetable_target_names_the_target_and_the_shortfall():
    decision = decide(grid(), profile(), Constraints(max_size_mb=20.0), FLAT)
    assert decision.chosen is None
    smallest = min(SIZES["int4"] * (0.3 + 0.7 * b) for b in (1.0, 0.8, 0.6))  # 60.8 MB
    assert (f"size {smallest:.3g} MB > target 20 MB (+{(smallest / 20 - 1) * 100:.0f} %) at "
            f"best (β 0.6 int4), short by {smallest - 20:.3g} MB") in decision.explanation
    assert "decode" not in decision.explanation.split("Offer")[0]  # int4 decodes fast enough


def test_without_measured_quality_the_largest_budget_at_the_highest_precision():
    cands = [Candidate(c.cost, c.precision) for c in grid()]
    decision = decide(cands, profile(download_mb=100.0), efficiency=FLAT)
    assert chosen(decision) == (1.0, "int4")  # β 1: int4 is the only precision that fits
    assert "Quality is not measured" in decision.explanation


def test_precisions_the_runtime_does_not_run_are_refused():
    with pytest.raises(ValueError, match=r"runs executorch, which ships fp32, 8da4w; not int4"):
        decide(grid(("fp32", "int4")), profile(runtime="executorch"), efficiency=FLAT)
    with pytest.raises(ValueError, match=r"duplicate candidates \['1 fp32'\]"):
        decide(grid(("fp32",))[:1] * 2, profile(), efficiency=FLAT)
    with pytest.raises(ValueError, match=r"--max-size -1 must be a positive number"):
        Constraints(max_size_mb=-1)
    with pytest.raises(ValueError, match=r"--quality-tolerance 1.5 must be in \[0, 1\)"):
        Constraints(quality_tolerance=1.5)


def test_manifest_dict_holds_quality_and_the_choice():
    data = json.loads(json.dumps(decide(grid(), profile(download_mb=100.0), efficiency=FLAT)
                                 .to_dict()))
    assert data["chosen_beta"] == 1.0 and data["chosen_precision"] == "int4"
    row = next(b for b in data["budgets"] if b["chosen"])
    assert row["quality"]["ppl"] == 47.0 and row["size_mb"] == pytest.approx(84.4)
    assert data["limits"]["size"] == {"value": 100.0, "source": "profile synthetic"}


def test_two_runtimes_each_precision_priced_on_the_runtime_that_ships_it(slower_onnxruntime):
    """A phone that runs ExecuTorch and onnxruntime-genai: 8da4w and fp32 are predicted as
    a profile running ExecuTorch alone predicts them, int4 as one running onnxruntime
    alone; the best quality that fits wins whichever runtime ships it."""
    both = profile(runtime="executorch", also_runs=("onnxruntime",))
    cands = [candidate(1.0, "fp32", 540.0, 44.0), candidate(1.0, "8da4w", 75.0, 50.0),
             candidate(1.0, "int4", 84.4, 47.0), candidate(0.8, "int4", 70.0, 56.0)]
    decision = decide(cands, both)
    alone = {"executorch": profile(runtime="executorch"), "onnxruntime": profile()}
    for row in decision.rows:
        single = decide([c for c in cands if (c.beta, c.precision) == (row.beta, row.precision)],
                        alone[row.runtime])
        assert row.runtime == {"fp32": "executorch", "8da4w": "executorch",
                               "int4": "onnxruntime"}[row.precision]
        assert row.prediction == single.rows[0].prediction
        other = alone["onnxruntime" if row.runtime == "executorch" else "executorch"]
        if row.precision == "fp32":  # fp32 runs on both: the default runtime prices it
            assert row.prediction != decide([c for c in cands if c.precision == "fp32"],
                                            other).rows[0].prediction
    assert chosen(decision) == (1.0, "int4") and decision.runtime == "onnxruntime"
    assert "ships on synthetic, in onnxruntime." in decision.explanation
    assert " runtime " in decision.table().splitlines()[2]  # a runtime column
    data = decision.to_dict()
    assert data["chosen_runtime"] == "onnxruntime"
    assert data["runtimes"] == ["executorch/xnnpack", "onnxruntime/cpu"]
    assert {(b["precision"], b["runtime"]) for b in data["budgets"]} == \
        {("fp32", "executorch"), ("8da4w", "executorch"), ("int4", "onnxruntime")}

    # int4 at 84.4 MB over a 80 MB download limit: the 8da4w program (75 MB) ships instead
    tight = decide(cands, profile(runtime="executorch", also_runs=("onnxruntime",),
                                  download_mb=80.0), efficiency=FLAT)
    assert chosen(tight) == (1.0, "8da4w") and tight.runtime == "executorch"
    # without onnxruntime, int4 is not a candidate the profile can ship
    with pytest.raises(ValueError, match=r"synthetic runs executorch, which ships fp32, 8da4w; "
                                         r"not int4"):
        decide(cands, profile(runtime="executorch"))
