"""Depth axis on tiny random models: the stand-in block (full-rank adapters = the original
block in float64; DataSVD adapter error = tail energy; output scales match feature RMS on
the data; donor weights stored once), the depth probe against references computed another
way (Hugging Face's hidden states, a model with the block deleted), its cache, and the
joint plan of a probed model against brute force."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2, token_batches
from safetensors.torch import load_file, save_file

from flexrank.compress.config import ProbeConfig
from flexrank.compress.covariance import collect_covariances
from flexrank.compress.decompose import Whitening, output_error
from flexrank.compress.depth import (
    DepthConfig,
    SharedLinear,
    adapter_init,
    block_linears,
    build_stand_in,
    dense_weight,
    probe_depth,
    replace_blocks_,
    set_adapter_rank_,
)
from flexrank.compress.probe import probe
from flexrank.compress.surgery import factorize_
from flexrank.planning.costs import ParamsCost, cost_matrix
from flexrank.planning.depth import KEPT, joint_plan, nesting_problems, stand_in_cost


def llama(num_layers: int = 4, seed: int = 0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=num_layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, initializer_range=0.2)
    return LlamaForCausalLM(config).to(dtype).eval()


def logits(model, batches):
    with torch.no_grad():
        return [model(**b, use_cache=False).logits for b in batches]


@pytest.fixture(scope="module")
def llama64():
    """A float64 tiny Llama, its calibration batches and covariances."""
    model = llama(dtype=torch.float64)
    batches = token_batches(100, num=6, batch=4, seq=16)
    return model, batches, collect_covariances(model, batches, precise=True, progress=False)


@pytest.mark.parametrize("pair", [(1, 0), (2, 3), (3, 1)])
def test_full_rank_stand_in_equals_original_block(llama64, pair):
    model, batches, stats = llama64
    i, d = pair
    reference = logits(model, batches[:2])
    blocks = model.model.layers
    stand_in = build_stand_in(blocks[i], blocks[d], f"model.layers.{i}", stats, max_rank=64)
    original = blocks[i]
    blocks[i] = stand_in
    try:
        got = logits(model, batches[:2])
    finally:
        blocks[i] = original
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    shared = [m for m in stand_in.modules() if isinstance(m, SharedLinear)]
    assert len(shared) == 7
    for m in shared:  # full rank: the normalisation is the identity
        torch.testing.assert_close(m.scale, torch.ones_like(m.scale), rtol=0, atol=1e-10)
        assert any(m.donor is layer for layer in block_linears(blocks[d]).values())


def test_full_rank_stand_in_with_biases_gpt2():
    """GPT-2: transposed Conv1D layers with biases, blocks returning tuples."""
    model = tiny_gpt2().double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    batches = token_batches(100, num=4)
    stats = collect_covariances(model, batches, progress=False)
    reference = logits(model, batches[:1])
    replace_blocks_(model, {1: (0, 128)}, stats)
    torch.testing.assert_close(logits(model, batches[:1])[0], reference[0], rtol=0, atol=1e-10)


def test_adapter_error_is_the_whitened_tail_energy(llama64):
    """E‖(W − W_donor − U_a V_aᵀ) x‖² over the calibration inputs = Σ_{j>a} σ_j² (DataSVD),
    the left side computed from the covariance, not from the factorisation."""
    model, _, stats = llama64
    layers = model.model.layers
    W, _ = dense_weight(layers[2].mlp.down_proj)
    Wd, _ = dense_weight(layers[1].mlp.down_proj)
    cov = stats.covariance("model.layers.2.mlp.down_proj")[0]
    U, V, sigma = adapter_init(W, Wd, 64, Whitening.of(cov))
    for a in (1, 4, 16, 32):
        error = output_error(W - Wd, U, V, a, cov)
        assert float(error) == pytest.approx(float(sigma[a:].square().sum()), rel=1e-8)
    errors = [float(output_error(W - Wd, U, V, a, cov)) for a in range(0, 33, 4)]
    assert errors == sorted(errors, reverse=True)


def test_output_scale_matches_feature_rms_on_the_data(llama64):
    """At a low adapter rank every output feature of the stand-in has the original layer's
    root-mean-square over the calibration tokens (measured with a forward hook)."""
    model, batches, stats = llama64
    blocks = model.model.layers
    stand_in = build_stand_in(blocks[2], blocks[1], "model.layers.2", stats, max_rank=8)
    seen = {}

    def keep(name):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1])
            seen.setdefault(name, []).append((x, output.reshape(-1, output.shape[-1])))
        return hook

    original = blocks[2]
    handle = original.mlp.gate_proj.register_forward_hook(keep("orig"))
    with torch.no_grad():
        for b in batches:
            model(**b, use_cache=False)
    handle.remove()
    x = torch.cat([x for x, _ in seen["orig"]])
    y = torch.cat([y for _, y in seen["orig"]])
    with torch.no_grad():
        y_stand_in = stand_in.mlp.gate_proj(x)
        unscaled = y_stand_in / stand_in.mlp.gate_proj.scale
    torch.testing.assert_close(y_stand_in.square().mean(0).sqrt(), y.square().mean(0).sqrt(),
                               rtol=1e-8, atol=0)
    assert not torch.allclose(unscaled.square().mean(0), y.square().mean(0), rtol=1e-3)


def test_donor_weights_stored_once(tmp_path):
    model = llama()
    batches = token_batches(100, num=4)
    stats = collect_covariances(model, batches, progress=False)
    before = sum(p.numel() for p in model.parameters())
    replace_blocks_(model, {1: (0, 4), 3: (2, 8)}, stats)
    state = model.state_dict()
    pointers = [t.data_ptr() for t in state.values()]
    assert len(pointers) == len(set(pointers)) or all(  # only the tied embedding may repeat
        k in ("model.embed_tokens.weight", "lm_head.weight")
        for k in state if pointers.count(state[k].data_ptr()) > 1)
    assert not any(".donor." in k for k in state)
    linears = sum(p.numel() for i in (1, 3)
                  for layer in block_linears(llama().model.layers[i]).values()
                  for p in layer.parameters())
    adapters = sum((m.U.numel() + m.V.numel() + m.scale.numel())
                   for m in model.modules() if isinstance(m, SharedLinear))
    assert sum(p.numel() for p in model.parameters()) == before - linears + adapters
    state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # tied: stored once
    save_file(state, tmp_path / "replaced.safetensors")  # refuses tensors sharing memory
    fresh = llama(seed=1)
    replace_blocks_(fresh, {1: (0, 4), 3: (2, 8)}, None)
    fresh.load_state_dict(load_file(tmp_path / "replaced.safetensors"), strict=False)
    for a, b in zip(logits(fresh, batches[:1]), logits(model, batches[:1]), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_training_reaches_the_shared_weight_through_both_blocks():
    model = llama()
    replace_blocks_(model, {2: (1, 4)}, None)
    donor = model.model.layers[1].self_attn.q_proj.weight
    batch = token_batches(100, num=1)[0]
    model(**batch, use_cache=False).logits.sum().backward()
    grad_both = donor.grad.clone()
    model.zero_grad()
    stand_in = model.model.layers[2]
    model.model.layers[2] = _Passthrough()
    model(**batch, use_cache=False).logits.sum().backward()
    assert not torch.allclose(grad_both, donor.grad)
    assert stand_in.self_attn.q_proj.donor.weight is donor


class _Passthrough(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def kl(teacher, student, mask=None):
    per_token = F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1),
                         log_target=True, reduction="none").sum(-1)
    return float(per_token.mean())


@pytest.fixture(scope="module")
def probed():
    """A tiny 4-block Llama, factorised, its rank and depth probes on the same batch."""
    teacher = llama(seed=2)
    model = copy.deepcopy(teacher)
    batches = token_batches(100, num=8, batch=4, seq=16, seed=2)
    stats = collect_covariances(model, batches, progress=False)
    factorize_(model, stats, progress=False)
    config = DepthConfig(max_replaced=0.5, adapter_ranks=(2, 8, 32), donor_window=2)
    depth = probe_depth(model, batches[:2], stats, config, progress=False)
    sens = probe(model, teacher, batches[:2], ProbeConfig(mode="exact", num_levels=2),
                 progress=False)
    return teacher, model, batches, stats, depth, sens


def test_depth_probe_against_independent_references(probed):
    teacher, model, batches, stats, depth, _ = probed
    probe_batches = batches[:2]
    # cosine: Hugging Face's own hidden states (the last block's output is after the final
    # norm there, so blocks 0..2 only)
    cos = np.zeros(4)
    for b in probe_batches:
        with torch.no_grad():
            hs = model(**b, output_hidden_states=True, use_cache=False).hidden_states
        for i in range(3):
            cos[i] += float((1 - F.cosine_similarity(hs[i].double(), hs[i + 1].double(),
                                                     -1)).mean()) / len(probe_batches)
    np.testing.assert_allclose(depth.cosine[:3], cos[:3], rtol=1e-6)
    # dropping a block: a copy of the model with the block deleted
    reference = logits(model, probe_batches)
    for i in range(4):
        short = copy.deepcopy(model)
        del short.model.layers[i]
        short.config.num_hidden_layers = 3
        expected = np.mean([kl(t, s) for t, s in zip(reference, logits(short, probe_batches),
                                                     strict=True)])
        assert depth.skip_kl[i] == pytest.approx(expected, rel=1e-4)
    # stand-ins: candidates are the lowest cosine scores; donors are not candidates; the
    # KL with the stand-in built here and swapped in by hand
    assert depth.candidates == sorted(np.argsort(depth.cosine, kind="stable")[:2].tolist())
    assert not set(depth.donors) & set(depth.candidates)
    c, i, d = 0, depth.candidates[0], depth.donors[0]
    blocks = model.model.layers
    stand_in = build_stand_in(blocks[i], blocks[d], f"model.layers.{i}", stats, 32)
    original = blocks[i]
    for k, rank in enumerate(depth.adapter_ranks):
        set_adapter_rank_(stand_in, int(rank))
        blocks[i] = stand_in
        got = logits(model, probe_batches)
        blocks[i] = original
        expected = np.mean([kl(t, s) for t, s in zip(reference, got, strict=True)])
        assert depth.errors[c, k] == pytest.approx(expected, rel=1e-4, abs=1e-6)  # f32 noise
    assert depth.errors[c, -1] < 1e-6  # rank 32 = full rank of a 32-wide model
    assert depth.errors[c, 0] > depth.errors[c, -1]


def test_depth_probe_cache(probed, tmp_path):
    _, model, batches, stats, depth, _ = probed
    config = DepthConfig(max_replaced=0.5, adapter_ranks=(2, 8, 32), donor_window=2)
    path = tmp_path / "depth.json"
    first = probe_depth(model, batches[:2], stats, config, cache_path=path, progress=False)
    np.testing.assert_array_equal(first.errors, depth.errors)
    stamp = path.stat().st_mtime_ns
    again = probe_depth(model, batches[:2], stats, config, cache_path=path, progress=False)
    assert path.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again.errors, depth.errors)
    with pytest.raises(ValueError, match="another model, data or configuration"):
        probe_depth(model, batches[2:4], stats, config, cache_path=path, progress=False)
    with pytest.raises(ValueError, match="another model, data or configuration"):
        probe_depth(model, batches[:2], None, config, cache_path=path, progress=False)


def test_joint_plan_of_a_probed_model_equals_brute_force(probed):
    _, _, _, _, depth, sens = probed
    costs = cost_matrix(ParamsCost(), sens.shapes, sens.ranks)
    sens_m, depth_m = sens.monotone(), depth.monotone()
    per_block = []
    for j, block in enumerate(depth.blocks):
        layers = [i for i, n in enumerate(sens.layer_names) if n.startswith(block + ".")]
        options = []
        for levels in itertools.product(range(sens.num_levels), repeat=len(layers)):
            options.append((sum(costs[i, k] for i, k in zip(layers, levels, strict=True)),
                            sum(sens_m.errors[i, k] for i, k in zip(layers, levels,
                                                                       strict=True))))
        if j in depth.candidates:
            c = depth.candidates.index(j)
            options += [(stand_in_cost(ParamsCost(), depth.shapes[c], int(a)),
                         depth_m.errors[c, k]) for k, a in enumerate(depth.adapter_ranks)]
        per_block.append(np.array(options))
    dense = sum(m * n for m, n in sens.shapes)
    halves = []
    for part in (per_block[:2], per_block[2:]):  # every combination of each half's blocks
        cost, error = np.zeros(1), np.zeros(1)
        for options in part:
            cost = (cost[:, None] + options[None, :, 0]).ravel()
            error = (error[:, None] + options[None, :, 1]).ravel()
        halves.append((cost, error))
    (left_cost, left_error), (right_cost, right_error) = halves
    order = np.argsort(right_cost, kind="stable")
    right_cost, right_best = right_cost[order], np.minimum.accumulate(right_error[order])
    low = sum(o[:, 0].min() for o in per_block) / dense
    budgets = [round(low + f * (1 - low), 6) + 1e-6 for f in (0.1, 0.4, 0.7)] + [1.0]
    plan = joint_plan(sens, depth, budgets=budgets)
    for b, beta in enumerate(budgets):
        # the best right half within what each left half leaves of the budget
        index = np.searchsorted(right_cost, beta * dense * (1 + 1e-9) - left_cost, "right") - 1
        fits = index >= 0
        best = (left_error[fits] + right_best[index[fits]]).min()
        assert plan.dp_error[b] == pytest.approx(best, rel=1e-9, abs=1e-15)
    assert not nesting_problems(np.array(plan.ranks), np.array(plan.adapter_ranks))
    assert any(a != KEPT for a in plan.adapter_ranks[0])  # replacement pays at the bottom
    assert all(a == KEPT for a in plan.adapter_ranks[-1])


def test_depth_probe_on_gpt2_blocks_returning_tuples():
    """GPT-2's blocks return tuples: dropping one, its KL equals a model without it."""
    model = tiny_gpt2(seed=1)
    batches = token_batches(100, num=2, batch=2, seq=12, seed=4)
    depth = probe_depth(model, batches, None, DepthConfig(max_replaced=0.5, adapter_ranks=(4,)),
                        progress=False)
    reference = logits(model, batches)
    for i in range(2):
        short = copy.deepcopy(model)
        del short.transformer.h[i]
        short.config.n_layer = 1
        expected = np.mean([kl(t, s) for t, s in zip(reference, logits(short, batches),
                                                     strict=True)])
        assert depth.skip_kl[i] == pytest.approx(expected, rel=1e-4)
    assert depth.candidates == [int(np.argmin(depth.cosine))] and depth.donors == [
        1 - depth.candidates[0]]


def test_interrupted_depth_probe_resumes(probed, tmp_path, monkeypatch):
    """A probe stopped after its first stand-in resumes from the file and ends with the
    same figures as an uninterrupted one, measuring only the stand-ins left."""
    import flexrank.compress.depth as depth_module

    _, model, batches, stats, depth, _ = probed
    config = DepthConfig(max_replaced=0.5, adapter_ranks=(2, 8, 32), donor_window=2)
    path = tmp_path / "depth.json"
    built = []
    original = depth_module.build_stand_in

    def stop_after_one(*args, **kwargs):
        if built:
            raise KeyboardInterrupt
        built.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(depth_module, "build_stand_in", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        probe_depth(model, batches[:2], stats, config, cache_path=path, progress=False)
    monkeypatch.setattr(depth_module, "build_stand_in", lambda *a, **k: (
        built.append(a[2]), original(*a, **k))[1])
    resumed = probe_depth(model, batches[:2], stats, config, cache_path=path, progress=False)
    assert built == [f"model.layers.{i}" for i in depth.candidates]  # the second once
    np.testing.assert_allclose(resumed.errors, depth.errors, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(resumed.skip_kl, depth.skip_kl, rtol=1e-9)
    assert resumed.donors == depth.donors


@pytest.mark.parametrize("target, stop, saved", [
    ("_mean_damage", 2, 2),  # the drop pass: stopped after 2 of the 4 blocks
    ("_donor_error", 3, 2),  # donors (window 2): inside the second candidate's choice
    ("_mean_damage", 8, 7),  # 4 dropped blocks, the first stand-in's 3 ranks, 1 of the next
])
def test_depth_probe_resumes_mid_pass(probed, tmp_path, monkeypatch, target, stop, saved):
    """Stopped inside a pass after `stop` measurements, of which `saved` belong to items
    finished (and written) before the stop, the rerun makes only the measurements the file
    lacks and ends with the uninterrupted probe's figures."""
    import flexrank.compress.depth as depth_module

    _, model, batches, stats, depth, _ = probed
    config = DepthConfig(max_replaced=0.5, adapter_ranks=(2, 8, 32), donor_window=2)
    path = tmp_path / "depth.json"
    original = getattr(depth_module, target)
    calls, limit = [], [stop]

    def counted(*args, **kwargs):
        if limit and len(calls) == limit[0]:
            raise KeyboardInterrupt
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(depth_module, target, counted)
    with pytest.raises(KeyboardInterrupt):
        probe_depth(model, batches[:2], stats, config, cache_path=path, progress=False)
    assert len(calls) == stop
    calls.clear()
    limit.clear()
    resumed = probe_depth(model, batches[:2], stats, config, cache_path=path, progress=False)
    # uninterrupted: 4 dropped blocks + 2 stand-ins x 3 ranks; 2 candidates x 2 donors
    total = 4 + 2 * 3 if target == "_mean_damage" else 2 * 2
    assert len(calls) == total - saved
    np.testing.assert_allclose(resumed.errors, depth.errors, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(resumed.skip_kl, depth.skip_kl, rtol=1e-9)
    assert resumed.donors == depth.donors
