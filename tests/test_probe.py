"""Probing: cached equals uncached, candidate ranks, fast mode agrees at probed points,
resume after interruption, curves on real layers behave."""

import copy
import importlib

import numpy as np
import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, token_batches

from flexrank.compress.config import ProbeConfig
from flexrank.compress.covariance import collect_covariances
from flexrank.compress.probe import candidate_ranks, find_blocks, probe
from flexrank.compress.select import nested_layers
from flexrank.compress.surgery import factorize_


def factorised(build=tiny_llama, seed=0):
    teacher = build(seed=seed)
    model = copy.deepcopy(teacher)
    data = token_batches(100, num=2, batch=2, seq=12, seed=seed)
    factorize_(model, collect_covariances(model, data, progress=False), progress=False)
    return model, teacher, data


def test_candidate_ranks():
    ranks = candidate_ranks(576, 16, 8)
    assert len(ranks) == 16 and ranks[-1] == 576 and all(r % 8 == 0 for r in ranks)
    assert all(abs(r - 36 * (k + 1)) <= 4 for k, r in enumerate(ranks))  # evenly spread
    assert all(a < b for a, b in zip(ranks, ranks[1:], strict=False))
    ranks = candidate_ranks(32, 8, 8)  # too small for multiples of 8: step 1
    assert ranks == [4, 8, 12, 16, 20, 24, 28, 32]
    assert candidate_ranks(5, 5, 8) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="max rank 3"):
        candidate_ranks(3, 4, 8)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_block_cache_equals_full_forward(build):
    model, teacher, data = factorised(build)
    assert len(find_blocks(model)) == 2
    config = ProbeConfig(mode="exact", num_levels=4)
    cached = probe(model, teacher, data, config, progress=False)
    direct = probe(model, teacher, data, config, use_block_cache=False, progress=False)
    assert cached.layer_names == direct.layer_names
    np.testing.assert_allclose(cached.errors, direct.errors, rtol=1e-4, atol=1e-7)
    assert np.all(cached.errors[:, -1] == 0) and np.all(cached.errors[:, 0] > 0)
    assert np.all(cached.errors >= 0)
    # the model is left at full rank and unchanged
    with torch.no_grad():
        torch.testing.assert_close(model(**data[0]).logits, teacher(**data[0]).logits,
                                   rtol=1e-4, atol=1e-4)


def test_exact_entry_is_kl_of_single_truncation():
    # the untouched layers run as the probe runs them, one dense matmul each
    # (dense_at_max_rank, equal to the factored forward in float64: test below); in float32
    # the two forms' rounding moves this ~1e-6 KL by ~0.5 %
    from flexrank.compress.layers import dense_at_max_rank

    model, teacher, data = factorised()
    sens = probe(model, teacher, data, ProbeConfig(mode="exact", num_levels=4, top_k=0),
                 progress=False)  # the whole vocabulary's KL, as computed below
    name = "model.layers.1.mlp.down_proj"
    row = sens.layer_names.index(name)
    layer = model.get_submodule(name)
    layer.rank = int(sens.ranks[row, 1])
    kls = []
    with torch.no_grad(), dense_at_max_rank(nested_layers(model).values()):
        for b in data:
            p = torch.log_softmax(teacher(**b).logits, -1)
            q = torch.log_softmax(model(**b).logits, -1)
            kls.append(float((p.exp() * (p - q)).sum(-1).mean()))
    layer.rank = layer.max_rank
    assert sens.errors[row, 1] == pytest.approx(np.mean(kls), rel=1e-4)


def test_fast_mode_matches_exact_at_probed_levels():
    model, teacher, data = factorised()
    exact = probe(model, teacher, data, ProbeConfig(mode="exact", num_levels=6), progress=False)
    fast = probe(model, teacher, data, ProbeConfig(mode="fast", num_levels=6, probe_points=3),
                 progress=False)
    probed = fast.meta["probe_levels"]
    assert probed == [0, 2, 4]
    np.testing.assert_allclose(fast.errors[:, probed], exact.errors[:, probed], rtol=1e-5)
    # unprobed levels are filled with positive values in the probed neighbours' range
    filled = fast.errors[:, [1, 3]]
    assert np.all(filled > 0) and np.all(fast.errors[:, -1] == 0)


def test_interrupted_probe_resumes(tmp_path, monkeypatch):
    model, teacher, data = factorised()
    config = ProbeConfig(mode="exact", num_levels=4)
    reference = probe(model, teacher, data, config, progress=False)
    path = tmp_path / "probe.json"

    probe_module = importlib.import_module("flexrank.compress.probe")
    calls = {"n": 0}
    real = probe_module.write_json_atomic

    def crash_after_three(p, data_):
        real(p, data_)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(probe_module, "write_json_atomic", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        probe(model, teacher, data, config, cache_path=path, progress=False)
    monkeypatch.setattr(probe_module, "write_json_atomic", real)
    import json
    assert len(json.loads(path.read_text())["rows"]) == 3
    for layer in model.modules():  # the interrupted run may leave a layer truncated
        if hasattr(layer, "max_rank"):
            layer.rank = layer.max_rank
    resumed = probe(model, teacher, data, config, cache_path=path, progress=False)
    np.testing.assert_allclose(resumed.errors, reference.errors, rtol=1e-6)
    with pytest.raises(ValueError, match="another model or configuration"):
        probe(model, teacher, data, ProbeConfig(mode="exact", num_levels=3), cache_path=path,
              progress=False)


def test_monotone_forces_non_increasing_curves():
    from flexrank.planning.sensitivity import Sensitivity

    sens = Sensitivity(["a", "b"], [(4, 4), (4, 4)], [[1, 2, 3, 4]] * 2,
                       [[3.0, 1.0, 2.0, 0.0], [5.0, 4.0, 1.0, 0.0]])
    np.testing.assert_array_equal(sens.monotone().errors,
                                  [[3.0, 2.0, 2.0, 0.0], [5.0, 4.0, 1.0, 0.0]])


def test_probe_leaves_probed_layers_at_max_rank_and_restores_the_mode():
    """What `probe` documents that it mutates, against the state before the call."""
    model, teacher, data = factorised()
    layers = nested_layers(model)
    names = list(layers)
    only, outside = names[:3], names[3:]
    for layer in layers.values():  # a truncated state that the probe must not keep
        layer.rank = 1
    model.train()
    teacher.train()
    config = ProbeConfig(mode="fast", num_levels=4, probe_points=1)
    probe(model, teacher, data, config, only=only, progress=False)
    full = {name: layer.U.shape[1] for name, layer in layers.items()}  # U: (m, max rank)
    assert all(full[name] > 1 for name in names)  # so that rank 1 is a real truncation
    assert [layers[name].rank for name in only] == [full[name] for name in only]
    assert [layers[name].rank for name in outside] == [1] * len(outside)  # untouched
    assert all(m.training for m in model.modules())  # the caller's mode, restored
    assert not any(m.training for m in teacher.modules())  # left in eval mode

    model.eval()
    probe(model, teacher, data, config, progress=False)
    assert {name: layer.rank for name, layer in layers.items()} == full
    assert not any(m.training for m in model.modules())


def test_top_k_kl_against_brute_force():
    """top_k: the student's head computes only the teacher's top-k rows; the entry equals
    the KL of both distributions renormalised over each token's top-k teacher tokens,
    computed here from the full logits; top_k = vocabulary size is the full KL."""
    model, teacher, data = factorised(lambda seed: tiny_llama(seed=seed, init_std=0.2))
    name = "model.layers.0.self_attn.o_proj"
    exact = probe(model, teacher, data, ProbeConfig(mode="exact", num_levels=4, top_k=0),
                  progress=False, only=[name])
    whole = probe(model, teacher, data, ProbeConfig(mode="exact", num_levels=4, top_k=100),
                  progress=False, only=[name])
    assert exact.errors[0, 0] > 1e-2  # a real truncation, far above float32 rounding
    np.testing.assert_allclose(whole.errors, exact.errors, rtol=1e-4, atol=1e-7)
    k = 5
    sens = probe(model, teacher, data, ProbeConfig(mode="exact", num_levels=4, top_k=k),
                 progress=False, only=[name])
    layer = model.get_submodule(name)
    for level, rank in enumerate(sens.ranks[0][:-1]):
        layer.rank = int(rank)
        kls = []
        with torch.no_grad():
            for b in data:
                t, s = teacher(**b).logits, model(**b).logits  # (B, T, V) each
                ids = t.topk(k, -1).indices
                p = torch.log_softmax(t.gather(-1, ids), -1)
                q = torch.log_softmax(s.gather(-1, ids), -1)
                kls.append(float((p.exp() * (p - q)).sum(-1).mean()))
        layer.rank = layer.max_rank
        assert sens.errors[0, level] == pytest.approx(np.mean(kls), rel=1e-4)
        assert sens.errors[0, level] < exact.errors[0, level]  # the tail's mass is left out


def test_dense_at_max_rank_equals_the_factored_forward_and_is_released():
    """Probing runs the layers at max rank as one dense matmul (W = U Vᵀ formed on entry):
    the same logits as the two-matmul forward (float64), a lowered rank still reads the
    factors, and nothing is left behind on exit."""
    from flexrank.compress.layers import dense_at_max_rank

    model, _, data = factorised()
    model = model.double()
    layers = nested_layers(model)
    name = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        factored = model(**data[0]).logits
        layers[name].rank = layers[name].max_rank // 2
        factored_cut = model(**data[0]).logits
        layers[name].rank = layers[name].max_rank
        with dense_at_max_rank(layers.values()):
            dense = model(**data[0]).logits
            layers[name].rank = layers[name].max_rank // 2
            dense_cut = model(**data[0]).logits
            layers[name].rank = layers[name].max_rank
    torch.testing.assert_close(dense, factored, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dense_cut, factored_cut, rtol=1e-10, atol=1e-10)
    assert not torch.equal(factored_cut, factored)
    assert all(layer._dense_at_max_rank is None for layer in layers.values())
