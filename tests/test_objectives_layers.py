"""Intermediate-block matching (DistillConfig.intermediate_weight, objectives.layer_loss):
the loss against a float64 hand computation on fixed tensors, the blocks it reads from a
Hugging Face output, and a tiny BERT distilled with it (issue 19)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import tiny_cnn, token_batches

from flexrank.compress.config import DistillConfig, ProbeConfig
from flexrank.compress.covariance import collect_covariances
from flexrank.compress.distill import distill
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.objectives import block_states, layer_loss
from flexrank.compress.probe import probe
from flexrank.compress.surgery import factorize_
from flexrank.planning.planner import plan as make_plan

BUDGETS = (0.4, 0.6)


def token_terms_reference(s, t, mask) -> float:
    """token_cos + token_mse of one block, float64 loops (objectives.feature_terms)."""
    s, t, mask = (np.asarray(x, np.float64) for x in (s, t, mask))
    real = [(b, i) for b in range(s.shape[0]) for i in range(s.shape[1]) if mask[b, i]]
    tokens_t = np.array([t[b, i] for b, i in real])
    std = np.sqrt(((tokens_t - tokens_t.mean(0)) ** 2).mean(0))
    cos = [1 - s[b, i] @ t[b, i] / (np.linalg.norm(s[b, i]) * np.linalg.norm(t[b, i]))
           for b, i in real]
    mse = [(((s[b, i] - t[b, i]) / std) ** 2).mean() for b, i in real]
    return float(np.mean(cos) + np.mean(mse))


def test_layer_loss_equals_the_hand_computed_value():
    # block 1: t = (1,0), (0,1), σ = (0.5, 0.5); s differs in token 1's second feature
    # (2 vs 1): token cos 0, token MSE (0 + (1/0.5)²/2)/2 = 1. Block 2: s = t, 0.
    # Mean over the 2 blocks: 0.5
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    assert float(layer_loss([s, t], [t, t])) == pytest.approx(0.5, rel=1e-6)
    # block 3: s = 2t, parallel: cos 0; MSE per token ((1/0.5)²/2) = 2 → (1 + 0 + 2)/3
    assert float(layer_loss([s, t, 2 * t], [t, t, t])) == pytest.approx(1.0, rel=1e-6)

    generator = torch.Generator().manual_seed(5)
    s1, s2, t1, t2 = torch.randn(4, 2, 5, 6, generator=generator).unbind(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expected = (token_terms_reference(s1, t1, mask) + token_terms_reference(s2, t2, mask)) / 2
    assert float(layer_loss([s1, s2], [t1, t2], mask)) == pytest.approx(expected, rel=1e-5)
    s1b = s1.clone()
    s1b[0, 3] += 50  # a padded position
    assert float(layer_loss([s1b, s2], [t1, t2], mask)) == pytest.approx(expected, rel=1e-5)
    assert float(layer_loss([], [])) == 0.0
    with pytest.raises(ValueError, match="same depth"):
        layer_loss([s1], [t1, t2])


def bert(seed=0, layers=3):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=64, initializer_range=0.2)).eval()


def test_block_states_are_the_outputs_of_every_block_but_the_last():
    model = bert()
    batch = token_batches(100, num=1, batch=2, seq=7, seed=0)[0]
    outputs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outputs.append(o[0]))
             for layer in model.encoder.layer]
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    for h in hooks:
        h.remove()
    states = block_states(out)
    assert len(states) == 2  # 3 blocks, the last left to the output objective
    for state, hooked in zip(states, outputs[:2], strict=True):
        torch.testing.assert_close(state, hooked)
    with pytest.raises(ValueError, match="output_hidden_states"):
        block_states(model(**batch))


def student_of(teacher, train):
    student = copy.deepcopy(teacher)
    factorize_(student, collect_covariances(student, train, progress=False), progress=False)
    sens = probe(student, teacher, train[:1], ProbeConfig(mode="exact", num_levels=4),
                 progress=False)
    return student, make_plan(sens, budgets=BUDGETS)


@torch.no_grad()
def held_out_layer_loss(elastic, teacher, batches, beta) -> float:
    elastic.set_budget(beta)
    total = 0.0
    for b in batches:
        s = block_states(elastic.model(**b, output_hidden_states=True))
        t = block_states(teacher(**b, output_hidden_states=True))
        total += float(layer_loss(s, t, b["attention_mask"]))
    return total / len(batches)


def test_distillation_with_intermediate_matching_lowers_the_blocks_error():
    teacher = bert()
    train = token_batches(100, num=16, batch=8, seq=12, seed=0)
    held_out = token_batches(100, num=4, batch=8, seq=12, seed=100)
    plain, nested = student_of(teacher, train)
    layered = copy.deepcopy(plain)
    before = {b: held_out_layer_loss(ElasticModel(plain, nested), teacher, held_out, b)
              for b in BUDGETS}
    runs = {}
    for name, model, weight in (("plain", plain, 0.0), ("layers", layered, 1.0)):
        config = DistillConfig(steps=30, batch_size=8, lr=3e-4, warmup_steps=3,
                               checkpoint_every=0, objective="feature",
                               intermediate_weight=weight)
        runs[name] = distill(model, teacher, nested, train, config, progress=False)
    after = {name: {b: held_out_layer_loss(ElasticModel(m, nested), teacher, held_out, b)
                    for b in BUDGETS} for name, m in (("plain", plain), ("layers", layered))}
    for beta in BUDGETS:
        # the term reaches the blocks: their error falls, and by more than without it
        # (measured: 0.975x / 0.951x before, 0.987x / 0.953x the plain run's at 0.4 / 0.6;
        # at lr 1e-3 the plain run's blocks drift away, 0.41 -> 0.47 at 0.4)
        # (strict inequalities: margins of 2.5 % and 1.3 %, not fractions of a per cent
        # that another thread count's rounding could cross)
        assert after["layers"][beta] < before[beta], (beta, before, after)
        assert after["layers"][beta] < after["plain"][beta], (beta, after)
    # the logged losses are the output objective's alone in both runs (same first step)
    first = runs["plain"].losses[0], runs["layers"].losses[0]
    assert first[0] == pytest.approx(first[1], rel=1e-5)


def test_intermediate_matching_refuses_a_positional_model():
    teacher = tiny_cnn(0)
    images = list(torch.randn(16, 3, 16, 16).split(8))
    student = copy.deepcopy(teacher)
    factorize_(student, collect_covariances(student, images, progress=False), progress=False)
    sens = probe(student, teacher, images[:1], ProbeConfig(mode="exact", num_levels=4),
                 progress=False)
    config = DistillConfig(steps=1, batch_size=8, checkpoint_every=0, intermediate_weight=1.0)
    with pytest.raises(ValueError, match="positionally"):
        distill(student, teacher, make_plan(sens, budgets=BUDGETS), images, config,
                progress=False)
