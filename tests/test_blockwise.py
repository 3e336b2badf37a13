"""Block-sequential DataSVD (issue 20) against the all-at-once path, and bf16 weights.

Reference: `collect_covariances` over the whole model + `factorize_` (the path every other
test checks against brute force), and, for bf16, the dense bf16 layer itself."""

import copy

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, tiny_vit, token_batches

from flexrank.compress.blockwise import factorize_blockwise_
from flexrank.compress.config import FactorizeConfig
from flexrank.compress.covariance import collect_covariances
from flexrank.compress.layers import linear_weight
from flexrank.compress.select import find_targets, nested_layers
from flexrank.compress.surgery import factorize_


def deeper(build, seed: int, blocks: int = 3):
    """`build`'s tiny model with `blocks` blocks: from the third block on, a block's input
    is neither the embedding nor the first block's output."""
    config = copy.deepcopy(build(seed=seed).config)
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(config, key):
            setattr(config, key, blocks)
    torch.manual_seed(seed)
    return type(build())(config).eval()


def _both(model, batches, config=None):
    config = config or FactorizeConfig()
    whole, blockwise = copy.deepcopy(model), copy.deepcopy(model)
    stats = collect_covariances(whole, batches, include_lm_head=config.include_lm_head,
                                precise=True, progress=False)
    ref = factorize_(whole, stats, config, progress=False)
    got = factorize_blockwise_(blockwise, batches, config, precise=True, progress=False)
    return whole, blockwise, ref, got


@pytest.mark.parametrize("build,include_head", [(tiny_llama, False), (tiny_gpt2, True)])
def test_blockwise_factors_equal_all_at_once(build, include_head):
    model = deeper(build, seed=3).double()  # float64 throughout: agreement to rounding
    batches = token_batches(100, num=3, batch=4, seq=48, seed=1)  # 576 tokens: Σ full rank
    batches[1]["attention_mask"][0, 40:] = 0  # padding is skipped the same way
    config = FactorizeConfig(include_lm_head=include_head)
    whole, blockwise, ref, got = _both(model, batches, config)
    assert [r.name for r in got] == [r.name for r in ref]
    assert len(got) == len(find_targets(model, include_lm_head=include_head)) >= 13
    if include_head:  # a layer outside the blocks, calibrated in the last pass
        assert "lm_head" in {r.name for r in got}
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(b.sigma, a.sigma, rtol=1e-10, atol=1e-12)
    for (name, a), (_, b) in zip(nested_layers(whole).items(),
                                 nested_layers(blockwise).items(), strict=True):
        # factors agree up to the sign of each singular pair: compare the rank-r products
        for r in (1, a.max_rank // 2, a.max_rank):
            torch.testing.assert_close(b.dense_weight(r), a.dense_weight(r), rtol=1e-9,
                                       atol=1e-11, msg=f"{name} at rank {r}")


def test_blockwise_vision_model_with_layers_before_the_blocks():
    model = tiny_vit(seed=2).double()
    images = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i),
                          dtype=torch.float64) for i in range(2)]
    whole, blockwise, ref, got = _both(model, images)
    names = [r.name for r in got]
    assert names == [r.name for r in ref] and any("patch_embeddings" in n for n in names)
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(b.sigma, a.sigma, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("blockwise", [True, False])
def test_factorising_frees_each_dense_layer_once_replaced(blockwise, monkeypatch):
    """While a model is factorised nothing keeps a replaced layer's dense weight: the peak
    of a large model is its factors, not its factors beside every dense layer (Llama-3.2-3B
    shapes: 0.2 GB of bf16 weights a block, 5.6 GB over 28 blocks, were held by the dict
    of targets until the end). Weak references to every weight, checked each time a layer
    is about to be factorised: every layer replaced before it is gone."""
    import gc
    import weakref

    import flexrank.compress.surgery as surgery

    model = deeper(tiny_llama, seed=2)
    batches = token_batches(model.config.vocab_size, num=2, batch=2, seq=16)
    targets = find_targets(model)
    refs = {name: weakref.ref(module.weight) for name, module in targets.items()}
    del targets
    replaced, alive = [], {}
    real = surgery.factorize_layer

    def watched(name, module, *args, **kwargs):
        gc.collect()
        alive[name] = [done for done in replaced if refs[done]() is not None]
        replaced.append(name)
        return real(name, module, *args, **kwargs)

    monkeypatch.setattr(surgery, "factorize_layer", watched)
    if blockwise:
        factorize_blockwise_(model, batches, progress=False)
    else:
        factorize_(model, collect_covariances(model, batches, progress=False), progress=False)
    assert len(replaced) == 21 and set(replaced) == set(nested_layers(model))
    assert {name: kept for name, kept in alive.items() if kept} == {}


def test_blockwise_refuses_plain_method():
    with pytest.raises(ValueError, match="needs no calibration"):
        factorize_blockwise_(tiny_llama(), token_batches(100, num=1),
                             FactorizeConfig(method="plain"))


@pytest.mark.parametrize("blockwise", [False, True])
def test_bf16_model_stays_bf16_and_full_rank_factors_reproduce_it(blockwise):
    model = tiny_llama(seed=4, init_std=0.2).to(torch.bfloat16)
    dense = {n: linear_weight(m)[0].double() for n, m in find_targets(model).items()}
    batches = token_batches(100, num=4, batch=4, seq=16, seed=2)
    with torch.no_grad():
        reference = model(**batches[0]).logits.double()
    if blockwise:
        factorize_blockwise_(model, batches, progress=False)
    else:
        factorize_(model, collect_covariances(model, batches, progress=False), progress=False)
    layers = nested_layers(model)
    assert set(layers) == set(dense)
    bf16_eps = torch.finfo(torch.bfloat16).eps  # 2^-7: one rounding of each factor entry
    for name, layer in layers.items():
        assert layer.U.dtype == layer.V.dtype == torch.bfloat16
        assert torch.isfinite(layer.U).all() and torch.isfinite(layer.V).all()
        product = layer.U.double() @ layer.V.double().T  # (m, n) at full rank
        error = (product - dense[name]).norm() / dense[name].norm()
        assert error < 2 * bf16_eps, f"{name}: relative error {error:.2e}"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        logits = model(**batches[0]).logits.double()
    assert torch.isfinite(logits).all()
    # the whole factorised model at full rank against the dense bf16 model
    drift = (logits - reference).norm() / reference.norm()
    assert drift < 4 * bf16_eps, f"logits drift {drift:.2e}"


def test_compress_in_bf16_and_resume_only_as_bf16(tmp_path):
    """compress(dtype=bf16): the elastic student is bf16 and finite, the full budget
    reproduces the bf16 teacher within bf16 rounding, and the folder does not resume as
    float32; student_copy(share=True) holds the teacher's own untouched tensors."""
    from conftest import char_tokenizer

    from flexrank.compress.config import CompressConfig, DistillConfig, ProbeConfig
    from flexrank.compress.pipeline import CompressError, compress, student_copy

    teacher = tiny_llama(init_std=0.2)
    teacher.save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("".join(f"{i} the quick brown fox jumps over the lazy dog\n"
                            for i in range(400)))
    config = CompressConfig(calib=str(text), num_samples=16, seq_len=32, eval_samples=0,
                            batch_size=4, budgets=(1.0, 0.7),
                            probe=ProbeConfig(mode="fast", num_levels=4, probe_points=1),
                            probe_samples=2, distill=DistillConfig(steps=0))
    elastic, _ = compress(tmp_path / "model", tmp_path / "out", config, dtype=torch.bfloat16)
    student = elastic.model
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}
    assert all(torch.isfinite(p).all() for p in student.parameters())
    reference = teacher.to(torch.bfloat16)
    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    elastic.set_budget(1.0)
    with torch.no_grad():
        got, want = student(ids).logits.double(), reference(ids).logits.double()
    bf16_eps = torch.finfo(torch.bfloat16).eps
    assert (got - want).norm() / want.norm() < 4 * bf16_eps
    with pytest.raises(CompressError, match="differs in: dtype"):
        compress(tmp_path / "model", tmp_path / "out", config)
    # the command line: --dtype bfloat16 gives the same bf16 checkpoint
    from flexrank.cli import main
    from flexrank.compress.elastic import ElasticModel

    assert main(["compress", str(tmp_path / "model"), "-o", str(tmp_path / "cli"),
                 "--dtype", "bfloat16", "--calib", str(text), "--samples", "16",
                 "--seq-len", "32", "--eval-samples", "0", "--batch-size", "4",
                 "--budgets", "1,0.7", "--levels", "4", "--probe-points", "1",
                 "--probe-samples", "2", "--steps", "0"]) == 0
    saved = ElasticModel.from_pretrained(tmp_path / "cli" / "elastic").model
    assert {p.dtype for p in saved.parameters()} == {torch.bfloat16}
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(tensor, student.state_dict()[name], rtol=0, atol=0)

    shared = student_copy(teacher, share=True)
    assert shared.model.embed_tokens.weight is teacher.model.embed_tokens.weight
    assert shared.model.layers[0] is not teacher.model.layers[0]
    copied = student_copy(teacher, share=False)
    assert copied.model.embed_tokens.weight is not teacher.model.embed_tokens.weight
