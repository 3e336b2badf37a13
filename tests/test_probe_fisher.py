"""Fisher probing: its second-order KL against the measured KL of each truncation
(probe's exact mode, itself checked against a brute-force KL in test_probe.py)."""

import copy

import numpy as np
import pytest
import torch
from conftest import tiny_bert, tiny_llama, token_batches

from flexrank.compress.config import ProbeConfig
from flexrank.compress.covariance import collect_covariances
from flexrank.compress.probe import probe
from flexrank.compress.surgery import factorize_


def factorised_float64():
    teacher = tiny_llama(seed=0, init_std=0.2).double()
    model = copy.deepcopy(teacher)
    data = token_batches(100, num=2, batch=2, seq=24, seed=0)
    data[1]["attention_mask"][0, :5] = 0  # padding: those tokens count in neither KL
    factorize_(model, collect_covariances(model, data, progress=False), progress=False)
    return model, teacher, data


def test_fisher_estimates_the_measured_kl():
    model, teacher, data = factorised_float64()
    exact = probe(model, teacher, data, ProbeConfig(mode="exact", num_levels=8, top_k=0),
                  progress=False)
    fisher = probe(model, teacher, data,
                   ProbeConfig(mode="fisher", num_levels=8, fisher_draws=300), progress=False)
    assert fisher.layer_names == exact.layer_names
    np.testing.assert_array_equal(fisher.ranks, exact.ranks)
    assert fisher.meta["probe_levels"] == []  # nothing measured: the estimate alone
    # near full rank the expansion is exact up to the sampling noise of 300 draws (the
    # generator is seeded: the same labels on every run)
    ratio = fisher.errors[:, 6] / exact.errors[:, 6]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.05)
    assert np.all((ratio > 0.8) & (ratio < 1.2)), ratio
    # further down it orders the layers as the measurement does
    for level in (2, 4):
        ranked = [np.argsort(np.argsort(s.errors[:, level])) for s in (fisher, exact)]
        assert np.corrcoef(*ranked)[0, 1] > 0.9
    # the model is left at full rank and unchanged
    with torch.no_grad():
        torch.testing.assert_close(model(**data[0]).logits, teacher(**data[0]).logits)


def test_fisher_refuses_a_model_without_token_logits():
    teacher = tiny_bert()
    model = copy.deepcopy(teacher)
    data = token_batches(100, num=1, batch=2, seq=8)
    factorize_(model, collect_covariances(model, data, progress=False), progress=False)
    with pytest.raises(ValueError, match="fisher probing.*mode='fast'"):
        probe(model, teacher, data, ProbeConfig(mode="fisher", num_levels=4), progress=False)
    # auto: fast mode for it, whose measured points equal fast mode's own
    auto = probe(model, teacher, data, ProbeConfig(mode="auto", num_levels=4), progress=False)
    fast = probe(model, teacher, data, ProbeConfig(mode="fast", num_levels=4), progress=False)
    assert (auto.meta["mode"], auto.meta["asked_mode"]) == ("fast", "auto")
    np.testing.assert_array_equal(auto.errors, fast.errors)


def test_auto_is_fisher_for_a_language_model():
    model, teacher, data = factorised_float64()
    config = {"num_levels": 8, "fisher_draws": 20, "fisher_points": 1}
    auto = probe(model, teacher, data, ProbeConfig(mode="auto", **config), progress=False)
    fisher = probe(model, teacher, data, ProbeConfig(mode="fisher", **config), progress=False)
    assert auto.meta["mode"] == "fisher"
    np.testing.assert_array_equal(auto.errors, fisher.errors)


def test_compress_with_fisher_probing_in_bf16(tmp_path):
    """`flexrank compress --probe-mode fisher` on a bf16 model: the sensitivity matrix says
    fisher, every cut rank has a finite positive damage that grows as the rank falls, and
    the plan meets its budgets; the flags reach the config."""
    import argparse
    import json

    from conftest import char_tokenizer

    from flexrank.cli import main
    from flexrank.cli.compress import add_compress_args, compress_config
    from flexrank.planning.planner import NestedPlan
    from flexrank.planning.sensitivity import Sensitivity

    parser = argparse.ArgumentParser()
    add_compress_args(parser)
    probe_config = compress_config(parser.parse_args(["--probe-mode", "fisher",
                                                      "--fisher-draws", "4"])).probe
    assert (probe_config.mode, probe_config.fisher_draws) == ("fisher", 4)

    tiny_llama(init_std=0.2).save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("".join(f"{i} the quick brown fox jumps over the lazy dog\n"
                            for i in range(400)))
    out = tmp_path / "out"
    assert main(["compress", str(tmp_path / "model"), "-o", str(out), "--dtype", "bfloat16",
                 "--calib", str(text), "--samples", "16", "--seq-len", "32",
                 "--eval-samples", "0", "--batch-size", "4", "--budgets", "1,0.7",
                 "--levels", "4", "--probe-mode", "fisher", "--fisher-draws", "4",
                 "--probe-samples", "2", "--steps", "0"]) == 0
    sens = Sensitivity.load(out / "stages" / "sensitivity.json")
    assert sens.meta["mode"] == "fisher" and sens.meta["fisher_draws"] == 4
    assert np.all(np.isfinite(sens.errors))
    totals = sens.errors.sum(0)  # over layers: the damage falls as the kept rank grows
    assert totals[0] > totals[1] > totals[2] > 0, totals
    plan = NestedPlan.load(out / "stages" / "plan.json")
    assert plan.budgets == (0.7, 1.0)
    assert plan.cost[0] <= 0.7 * plan.dense_cost * 1.001
    assert json.loads((out / "flexrank-compress.json").read_text())["signature"]["probe"][
        "mode"] == "fisher"


def test_fisher_points_rescale_the_estimate_to_measured_kl():
    """fisher_points=1 measures the middle cut level as exact mode does and scales the
    estimate's whole curve by that one ratio; the estimate itself (same seed) is the one
    fisher mode gives alone."""
    model, teacher, data = factorised_float64()
    exact = probe(model, teacher, data, ProbeConfig(mode="exact", num_levels=8, top_k=0),
                  progress=False)
    alone = probe(model, teacher, data,
                  ProbeConfig(mode="fisher", num_levels=8, fisher_draws=20), progress=False)
    scaled = probe(model, teacher, data, ProbeConfig(mode="fisher", num_levels=8,
                                                     fisher_draws=20, fisher_points=1,
                                                     top_k=0), progress=False)
    assert scaled.meta["probe_levels"] == [3]
    np.testing.assert_allclose(scaled.errors[:, 3], exact.errors[:, 3], rtol=1e-9)
    ratio = exact.errors[:, 3] / alone.errors[:, 3]
    np.testing.assert_allclose(scaled.errors[:, :-1], alone.errors[:, :-1] * ratio[:, None],
                               rtol=1e-9)
    assert np.all(scaled.errors[:, -1] == 0)


def test_a_resumed_fisher_probe(tmp_path):
    """A fisher probe whose rows are all in its cache file returns them without running
    (a run killed after its last row); a partial file written before the fisher settings
    existed (no fisher keys) is still that probe's."""
    import json

    model, teacher, data = factorised_float64()
    config = ProbeConfig(mode="fisher", num_levels=8, fisher_draws=10)
    path = tmp_path / "probe-partial.json"
    first = probe(model, teacher, data, config, cache_path=path, progress=False)
    again = probe(model, teacher, data, config, cache_path=path, progress=False)
    np.testing.assert_array_equal(again.errors, first.errors)

    fast = ProbeConfig(mode="fast", num_levels=4, probe_points=1, top_k=0)
    fast_path = tmp_path / "fast-partial.json"
    done = probe(model, teacher, data, fast, cache_path=fast_path, progress=False)
    saved = json.loads(fast_path.read_text())
    assert "fisher_draws" not in saved["signature"]["config"]
    # as the release before the fisher settings wrote it: top_k 0 in, no fisher keys
    saved["signature"]["config"] = {"type": "ProbeConfig", "mode": "fast", "num_levels": 4,
                                    "rank_multiple": 8, "probe_points": 1, "top_k": 0,
                                    "version": 1}
    saved["rows"] = {name: [99.0] * 3 + [0.0] for name in saved["rows"]}  # marks reuse
    fast_path.write_text(json.dumps(saved))
    resumed = probe(model, teacher, data, fast, cache_path=fast_path, progress=False)
    assert np.all(resumed.errors[:, :-1] == 99.0) and done.errors[0, 0] != 99.0
