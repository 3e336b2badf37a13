"""Surgery on tiny models: full rank reproduces outputs, covariances are exact and shared,
shards sum to the whole, DataSVD never loses to plain SVD on the calibration data."""

import pytest
import torch
from conftest import tiny_bert, tiny_cnn, tiny_gpt2, tiny_llama, tiny_vit, token_batches
from torch import nn

from flexrank.compress.config import FactorizeConfig
from flexrank.compress.covariance import collect_covariances, layer_inputs
from flexrank.compress.decompose import output_error, plain_svd, tail_energy
from flexrank.compress.layers import NestedConv1d, NestedConv2d, NestedLinear, linear_weight
from flexrank.compress.select import find_targets, nested_layers
from flexrank.compress.surgery import factorize_


def image_batches(num=3, batch=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(num)]


def run(model, batch):
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") and out.logits is not None else out[0]


CASES = {
    "llama": (tiny_llama, lambda: token_batches(100)),
    "gpt2": (tiny_gpt2, lambda: token_batches(100)),
    "bert": (tiny_bert, lambda: token_batches(100)),
    "vit": (tiny_vit, image_batches),
    "cnn": (tiny_cnn, image_batches),
}


@pytest.mark.parametrize("arch", sorted(CASES))
@pytest.mark.parametrize("method", ["data", "plain"])
def test_full_rank_reproduces_model(arch, method):
    build, batches = CASES[arch]
    model, data = build(), batches()
    with torch.no_grad():
        reference = [run(model, b) for b in data]
    n_targets = len(find_targets(model))
    stats = collect_covariances(model, data, progress=False) if method == "data" else None
    reports = factorize_(model, stats, FactorizeConfig(method=method), progress=False)
    assert len(reports) == n_targets == len(nested_layers(model)) > 0
    assert all(r.whitened == (method == "data") for r in reports)
    with torch.no_grad():
        for b, ref in zip(data, reference, strict=True):
            torch.testing.assert_close(run(model, b), ref, rtol=1e-4, atol=1e-4)


def test_lm_head_excluded_by_default_and_includable():
    model = tiny_llama()
    assert "lm_head" not in find_targets(model)
    assert "lm_head" in find_targets(model, include_lm_head=True)
    gpt2 = tiny_gpt2()
    assert "lm_head" not in find_targets(gpt2)
    assert isinstance(find_targets(gpt2)["transformer.h.0.attn.c_attn"], nn.Module)


def test_qkv_and_gate_up_share_one_covariance():
    model = tiny_llama()
    stats = collect_covariances(model, token_batches(100, num=2), progress=False)
    lead = stats.leader_of
    for block in range(2):
        p = f"model.layers.{block}."
        q = p + "self_attn.q_proj"
        assert lead[p + "self_attn.k_proj"] == lead[p + "self_attn.v_proj"] == q
        assert lead[p + "mlp.up_proj"] == p + "mlp.gate_proj"
        assert lead[p + "self_attn.o_proj"] == p + "self_attn.o_proj"
        assert lead[p + "mlp.down_proj"] == p + "mlp.down_proj"
    assert len(stats.sums) == 8  # 4 distinct inputs per block


def test_covariance_equals_direct_computation_and_masks_padding():
    model = tiny_llama()
    batches = token_batches(100, num=2, batch=3, seq=10)
    batches[1]["attention_mask"][:, 7:] = 0  # last 3 tokens are padding
    captured = {}

    def keep(name):
        def hook(module, args):
            captured.setdefault(name, []).append(args[0].detach().double())
        return hook

    target = model.model.layers[1].mlp.down_proj
    handle = target.register_forward_pre_hook(keep("down"))
    with torch.no_grad():
        for b in batches:
            model(**b)
    handle.remove()
    rows = torch.cat([captured["down"][0].reshape(-1, 64),
                      captured["down"][1][:, :7].reshape(-1, 64)])
    stats = collect_covariances(model, batches, precise=True, progress=False)
    cov, count = stats.covariance("model.layers.1.mlp.down_proj")
    assert count == 3 * 10 + 3 * 7
    torch.testing.assert_close(cov, rows.T @ rows, rtol=1e-10, atol=1e-10)
    fast, _ = collect_covariances(model, batches, progress=False).covariance(
        "model.layers.1.mlp.down_proj")
    torch.testing.assert_close(fast, rows.T @ rows, rtol=1e-5, atol=1e-5)


def test_covariance_shards_sum_to_whole():
    model = tiny_gpt2()
    data = token_batches(100, num=4)
    whole = collect_covariances(model, data, progress=False)
    merged = collect_covariances(model, data[:2], progress=False)
    merged.merge_(collect_covariances(model, data[2:], progress=False))
    assert merged.counts == whole.counts
    for key in whole.sums:
        torch.testing.assert_close(merged.sums[key], whole.sums[key], rtol=1e-12, atol=1e-9)


def test_conv_covariance_matches_unfolded_patches():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 7, 7)
    rows = layer_inputs(conv, x).double()
    W, b = linear_weight(conv)
    # conv output = W @ patch + b for every patch
    expected = conv(x).permute(0, 2, 3, 1).reshape(-1, 5).double()
    torch.testing.assert_close(rows @ W.double().T + b.double(), expected, rtol=1e-5, atol=1e-5)
    conv1d = nn.Conv1d(4, 6, 3, padding=1, stride=2)
    y = torch.randn(2, 4, 9)
    rows = layer_inputs(conv1d, y).double()
    W, b = linear_weight(conv1d)
    expected = conv1d(y).transpose(1, 2).reshape(-1, 6).double()
    torch.testing.assert_close(rows @ W.double().T + b.double(), expected, rtol=1e-5, atol=1e-5)


def test_data_svd_beats_plain_svd_on_calibration_activations_every_rank():
    model = tiny_llama(seed=4)
    data = token_batches(100, num=4, batch=4, seq=24, seed=1)
    stats = collect_covariances(model, data, progress=False)
    targets = find_targets(model)
    weights = {n: linear_weight(m)[0].double() for n, m in targets.items()}
    reports = factorize_(model, stats, progress=False)
    for report in reports:
        layer = model.get_submodule(report.name)
        cov, _ = stats.covariance(report.name)
        plain = plain_svd(weights[report.name])
        tail = tail_energy(report.sigma)
        for r in range(1, layer.max_rank + 1):
            err = output_error(weights[report.name], layer.U.double(), layer.V.double(), r, cov)
            plain_err = output_error(weights[report.name], plain.U, plain.V, r, cov)
            assert err <= plain_err * (1 + 1e-4) + 1e-6
            # float32 factors: the measured error equals the predicted tail energy
            torch.testing.assert_close(err, tail[r], rtol=1e-3, atol=1e-4 * float(tail[0]))


def test_rank_setter_and_truncation_matches_factor_product():
    model = tiny_llama()
    factorize_(model, None, FactorizeConfig(method="plain"), progress=False)
    layer = model.model.layers[0].mlp.gate_proj
    assert isinstance(layer, NestedLinear) and layer.max_rank == 32
    x = torch.randn(5, 32)
    layer.rank = 7
    torch.testing.assert_close(layer(x), x @ (layer.U[:, :7] @ layer.V[:, :7].T).T)
    with pytest.raises(ValueError, match="out of range"):
        layer.rank = 33


def test_conv_layers_truncate_consistently():
    model = tiny_cnn()
    data = image_batches()
    stats = collect_covariances(model, data, progress=False)
    factorize_(model, stats, progress=False)
    assert isinstance(model.conv1, NestedConv2d) and isinstance(model.seq, NestedConv1d)
    conv = model.conv2
    conv.rank = 5
    x = torch.randn(2, 16, 8, 8)
    dense = nn.functional.conv2d(x, conv.dense_weight().reshape(24, 16, 3, 3), None, 2, 1)
    torch.testing.assert_close(conv(x), dense, rtol=1e-4, atol=1e-5)
