"""Latency of one inference of a vision model or encoder (issue 19): the work of one forward
pass counted with forward hooks (flexrank.compress.inference_cost) against counts derived
here by hand from the models' shapes, and the device model's prediction from it.

Every expected number below is written out from the layer shapes (patches, tokens,
kernel positions, output sizes), never read back from the counter."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_bert, tiny_cnn
from elastic_fixtures import nested_plan
from torch import nn

from flexrank.compress.budget_cost import budget_cost
from flexrank.compress.covariance import collect_covariances
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.inference_cost import (
    DENSE_ABOVE,
    count_work,
    factor_macs,
    sample_input,
)
from flexrank.compress.layers import NestedConv2d, NestedLinear
from flexrank.compress.surgery import factorize_
from flexrank.device.host import resolve_measured
from flexrank.device.predict import Efficiency, default_efficiency, inference_work, predict
from flexrank.device.profiles import load_profile

# the tiny ViT classifier: 16×16 images in 4×4 patches, width 32, 2 blocks, 4 heads
IMAGE, PATCH, CHANNELS, WIDTH, BLOCKS, HEADS, MLP, LABELS = 16, 4, 3, 32, 2, 4, 64, 5


def vit_classifier(image=IMAGE):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(
        image_size=image, patch_size=PATCH, num_channels=CHANNELS, hidden_size=WIDTH,
        num_hidden_layers=BLOCKS, num_attention_heads=HEADS, intermediate_size=MLP,
        num_labels=LABELS)).eval()


def vit_hand_count(linear_macs=None) -> dict:
    """MACs and weights of one 16×16 image through the ViT classifier, from its shapes.
    `linear_macs(m, n)`: a block linear's MACs per token (default dense m·n)."""
    per_token = linear_macs or (lambda m, n: m * n)
    patches = (IMAGE // PATCH) ** 2
    tokens = patches + 1  # + [CLS]
    patch_conv = patches * WIDTH * CHANNELS * PATCH * PATCH  # one output per patch
    block = tokens * (4 * per_token(WIDTH, WIDTH) + per_token(MLP, WIDTH)
                      + per_token(WIDTH, MLP))
    attention = 2 * HEADS * tokens * tokens * (WIDTH // HEADS)  # QKᵀ and AV
    head = WIDTH * LABELS  # the classifier reads the [CLS] token only
    return {"macs": patch_conv + BLOCKS * (block + attention) + head,
            "attention_macs": BLOCKS * attention,
            "scores": BLOCKS * 2 * HEADS * tokens * tokens,
            "matmul_weights": WIDTH * CHANNELS * PATCH * PATCH
            + BLOCKS * (4 * WIDTH * WIDTH + 2 * WIDTH * MLP) + WIDTH * LABELS,
            # biases (patch conv, q k v o, two MLP), 2 LayerNorms per block + the final
            # one, the [CLS] token and the position table, the classifier's bias
            "other_weights": WIDTH + BLOCKS * (4 * WIDTH + MLP + WIDTH + 2 * 2 * WIDTH)
            + 2 * WIDTH + WIDTH + tokens * WIDTH + LABELS}


def test_vit_count_equals_the_hand_count():
    model = vit_classifier()
    inputs, described, tokens = sample_input(model)
    assert described == "pixel_values (1, 3, 16, 16)" and tokens == 0
    work = count_work(model, inputs)
    hand = vit_hand_count()
    assert work.macs == hand["macs"]
    assert work.attention_macs == hand["attention_macs"]
    assert work.attention_activations == hand["scores"]
    assert work.matmul_weights == hand["matmul_weights"]
    assert work.other_weights == hand["other_weights"]
    # the same model counted on a batch of 3: every MAC three times
    assert count_work(model, torch.zeros(3, 3, 16, 16)).macs == 3 * hand["macs"]


def test_cnn_count_equals_the_hand_count_and_scales_with_the_image():
    model = tiny_cnn()
    for size in (16, 32):
        half = size // 2  # conv2 has stride 2
        conv1 = size * size * 16 * (3 * 3 * 3)  # out positions · C_out · C_in·k
        conv2 = half * half * 24 * (16 * 3 * 3)
        seq = half * half * 20 * (24 * 3)  # a Conv1d over the H/2·W/2 positions
        head = 20 * 10
        work = count_work(model, torch.zeros(1, 3, size, size))
        assert work.per_module["conv1"] == conv1 and work.per_module["conv2"] == conv2
        assert work.per_module["seq"] == seq and work.per_module["head"] == head
        assert work.macs == conv1 + conv2 + seq + head
        # weights: 16·27 + 24·144 + 20·72 + 10·20; biases 16 + 20 + 10 (conv2 has none)
        assert work.matmul_weights == 16 * 27 + 24 * 144 + 20 * 72 + 10 * 20
        assert work.other_weights == 16 + 20 + 10
        # activations: each kernel's input and output
        assert work.activations == (3 * size * size + 16 * size * size) \
            + (16 * size * size + 24 * half * half) + (24 * half * half + 20 * half * half) \
            + (20 + 10)


def test_factorised_layers_count_their_rank_not_the_dense_matrix():
    torch.manual_seed(0)
    m, n = 64, 48
    linear = nn.Linear(n, m)
    nested = NestedLinear.from_linear(linear, torch.randn(m, 30), torch.randn(n, 30))
    x = torch.zeros(5, n)  # 5 rows
    # rank 24: 112·24 = 2688 ≤ 0.9·3072 = 2764.8, two matmuls; rank 25: 2800, deployed dense
    for rank, expected in ((8, (m + n) * 8), (24, (m + n) * 24), (25, m * n)):
        nested.rank = rank
        work = count_work(nested, x)
        assert work.macs == 5 * expected and work.matmul_weights == expected
    # a rank-r conv: r·C_in·k per output position, then C_out·r in its 1×1 conv
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    nested = NestedConv2d.from_conv(conv, torch.randn(10, 6), torch.randn(54, 6))
    nested.rank = 3
    work = count_work(nested, torch.zeros(1, 6, 12, 12))  # 6×6 outputs
    assert work.macs == 36 * (3 * 6 * 9 + 10 * 3)
    assert work.matmul_weights == 3 * (54 + 10)
    assert factor_macs(10, 54, 3) == 3 * (10 + 54)


def test_dense_above_is_the_exporters_rule():
    from flexrank.exporters.common.gauge import DENSE_FRACTION

    assert DENSE_ABOVE == DENSE_FRACTION


def elastic_of(model, batches, fractions=(0.5, 1.0)):
    student = copy.deepcopy(model)
    factorize_(student, collect_covariances(student, batches, progress=False), progress=False)
    return ElasticModel(student, nested_plan(student, fractions))


def test_budget_cost_of_a_factorised_vit_is_the_hand_count_at_its_ranks():
    """budget_cost's inference figures at β 0.5: each block linear at its plan rank, counted
    by the deployed-form rule written out here, the rest dense."""
    model = vit_classifier()
    images = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i))
              for i in range(2)]
    elastic = elastic_of(model, images)
    ranks = elastic.layer_ranks(0.5)
    # nested_plan keeps round(0.5·max rank); every block linear here has max rank 32
    assert {ranks[k] for k in ranks if ".layer." in k} == {16}
    # the patch conv (32 × 48, max rank 32) and the classifier (5 × 32) are factorised too
    conv_rank, head_rank = ranks["vit.embeddings.patch_embeddings.projection"], \
        ranks["classifier"]

    def deployed(m, n, r):  # two matmuls (m+n)·r, or dense above 0.9·m·n
        return m * n if (m + n) * r > 0.9 * m * n else (m + n) * r

    hand = vit_hand_count(lambda m, n: deployed(m, n, 16))
    patches = (IMAGE // PATCH) ** 2
    dense_conv, dense_head = patches * WIDTH * 48, WIDTH * LABELS
    macs = hand["macs"] - dense_conv - dense_head + patches * deployed(WIDTH, 48, conv_rank) \
        + deployed(LABELS, WIDTH, head_rank)
    cost = budget_cost(elastic, 0.5)
    assert cost.inference_flops == 2 * macs
    assert cost.inference_attention_flops == 2 * hand["attention_macs"]
    assert cost.inference_input == "pixel_values (1, 3, 16, 16)" and cost.inference_tokens == 0
    assert budget_cost(elastic, 1.0).inference_flops == 2 * vit_hand_count()["macs"]
    # int8: the linear/conv weights read (as deployed at these ranks) at 1 byte, not 4
    matmul_weights = BLOCKS * (4 * deployed(WIDTH, WIDTH, 16) + deployed(MLP, WIDTH, 16)
                               + deployed(WIDTH, MLP, 16)) \
        + deployed(WIDTH, 48, conv_rank) + deployed(LABELS, WIDTH, head_rank)
    fp32, int8 = budget_cost(elastic, 0.5), budget_cost(elastic, 0.5, "int8")
    assert fp32.inference_weight_bytes - int8.inference_weight_bytes == 3 * matmul_weights
    assert fp32.inference_bytes - int8.inference_bytes == 3 * matmul_weights
    assert elastic.budget is None and all(layer.rank == layer.max_rank
                                          for layer in elastic.layers.values())
    # the decision table names the image an inference is priced for, not "64 tokens"
    from flexrank.device.decide import Candidate, decide

    table = decide([Candidate(fp32)], "pixel8").table()
    assert "one input of pixel_values (1, 3, 16, 16) (batch 1)" in table


def resnet(size):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    return ResNetForImageClassification(ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
        layer_type="basic", num_labels=5, image_size=size)).eval()


def test_cnn_prediction_grows_with_the_image_about_fourfold():
    """A ResNet at 224×224 against 112×112 (its config's image_size; every stride halves
    exactly): each conv does exactly 4× the MACs, the classifier the same, and the
    predicted latency on pixel8 follows the roofline written out here."""
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))]
    costs = {}
    for size in (112, 224):
        model = resnet(size)
        elastic = elastic_of(model, batches)
        costs[size] = budget_cost(elastic, 0.5)
        work = count_work(elastic.set_budget(0.5).model, torch.zeros(1, 3, size, size))
        costs[size, "work"] = work
    small, large = costs[112, "work"], costs[224, "work"]
    convs = [k for k, v in large.per_module.items() if v and "classifier" not in k]
    assert convs and all(large.per_module[k] == 4 * small.per_module[k] for k in convs)
    assert [k for k in large.per_module if "classifier" in k and large.per_module[k]]
    ratio = costs[224].inference_flops / costs[112].inference_flops
    assert 3.9 < ratio < 4.0  # the classifier after pooling does not grow

    profile = resolve_measured(load_profile("pixel8"))
    eff = default_efficiency(profile)
    times = {}
    for size in (112, 224):
        c = costs[size]
        compute = c.inference_flops / (profile.compute_gflops.value * 1e9 * eff.compute)
        memory = c.inference_bytes / (profile.memory_bandwidth_gbps.value * 1e9
                                      * eff.bandwidth)
        times[size] = predict(c, profile, eff).ttft_s
        assert times[size] == pytest.approx(max(compute, memory)
                                            + c.n_layers * eff.overhead_per_layer_s, rel=1e-12)
    assert times[224] > times[112]  # both carry the same per-layer overhead (7 × 50 µs)
    no_overhead = Efficiency(eff.bandwidth, eff.compute, 0.0, "test")
    grown = predict(costs[224], profile, no_overhead).ttft_s \
        / predict(costs[112], profile, no_overhead).ttft_s
    assert 3.5 < grown <= 4.0


def test_text_encoder_work_rescales_to_the_profiles_tokens():
    """Counted at 16 tokens and rescaled to 32 (attention by 4, weights by 1, the rest by
    2) against a count at 32: equal but for BERT's pooler, which reads the [CLS] token
    only (d² MACs that do not grow): 1 % covers it here."""
    model = tiny_bert()
    counted = {}
    for tokens in (16, 32):
        inputs, described, got = sample_input(model, tokens)
        assert described == f"{tokens} token ids" and got == tokens
        counted[tokens] = count_work(model, inputs)
    w16, w32 = counted[16], counted[32]
    assert w32.attention_macs == 4 * w16.attention_macs
    elastic = elastic_of(model, [{"input_ids": torch.randint(3, 100, (4, 16)),
                                  "attention_mask": torch.ones(4, 16, dtype=torch.long)}])
    cost = budget_cost(elastic, 1.0)
    assert cost.inference_tokens == 128 and cost.inference_input == "128 token ids"
    from dataclasses import replace

    at16 = replace(cost, inference_flops=float(w16.flops),
                   inference_attention_flops=float(2 * w16.attention_macs),
                   inference_bytes=w16.bytes(), inference_weight_bytes=w16.weight_bytes(),
                   inference_attention_bytes=4.0 * w16.attention_activations,
                   inference_tokens=16)
    flops, read = inference_work(at16, 32)
    assert flops == pytest.approx(w32.flops, rel=1e-2)
    assert read == pytest.approx(w32.bytes(), rel=1e-2)
    assert inference_work(at16, 16) == (pytest.approx(w16.flops), pytest.approx(w16.bytes()))


def test_bench_quality_plot_of_a_tiny_bert_is_cosine_against_ms_per_inference():
    """`flexrank bench`'s quality panel for an encoder (issue 19): per tier, every
    candidate's held-out cosine to the original (float64 NumPy, test_quality_kinds)
    against its predicted ms per inference (the roofline written out over a hook count at
    pixel8's 64 tokens), the tier's choice marked."""
    from test_encoders import bert_encoder, elastic_student
    from test_quality_kinds import bert_reference

    from flexrank.cli.bench import quality_plot_data
    from flexrank.compress.budget_cost import budget_costs
    from flexrank.compress.quality import measure_quality
    from flexrank.device.decide import Candidate, Quality
    from flexrank.runtime.bench import tier_decision

    student, teacher, plan, _, _ = elastic_student(bert_encoder)
    elastic = ElasticModel(student, plan)
    ids = torch.randint(1, 100, (8, 10), generator=torch.Generator().manual_seed(7))
    rows = {r["beta"]: r for r in measure_quality(elastic, ids, teacher, ["fp32"])}
    candidates = [Candidate(c, "fp32", Quality.from_row(rows[c.beta]))
                  for c in budget_costs(elastic)]
    profile = resolve_measured(load_profile("pixel8"))
    report = {"kind": "encoder",
              "tiers": [{"profile": "pixel8", "decision": tier_decision(candidates, profile)}]}
    data = quality_plot_data(report)
    assert data["metric"] == "cosine" and "cosine" in data["y_label"]
    assert data["x_label"].startswith("ms per inference")
    points = data["tiers"][0]["points"]
    assert sorted(p["beta"] for p in points) == sorted(elastic.budgets)
    eff = default_efficiency(profile)
    for p in points:
        reference = bert_reference(elastic, teacher, ids, p["beta"])
        assert p["y"] == pytest.approx(reference["cosine"], abs=1e-5)
        inputs, _, tokens = sample_input(elastic.set_budget(p["beta"]).model, 64)
        work = count_work(elastic.model, inputs)
        seconds = max(work.flops / (206.9e9 * eff.compute),
                      work.bytes() / (68.3e9 * eff.bandwidth)) + 2 * eff.overhead_per_layer_s
        assert p["x"] == pytest.approx(seconds * 1e3, rel=1e-9)
    chosen = [p for p in points if p["chosen"]]
    decision = report["tiers"][0]["decision"]
    assert len(chosen) == 1 and chosen[0]["beta"] == decision["chosen_beta"]
    assert all(p["fits"] for p in points)  # a tiny BERT meets pixel8's 100 ms
    by_beta = sorted(points, key=lambda p: p["beta"])
    assert by_beta[0]["x"] < by_beta[-1]["x"] and by_beta[0]["y"] < by_beta[-1]["y"]


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_text_encoder_attention_is_counted_once_per_block(kind):
    """QKᵀ and AV of T tokens in each of 2 blocks, 4 heads of width 8: 2·4·T²·8 MACs a
    block, beside the block's linears (4·32² + 2·32·64 MACs a token)."""
    from transformers import DistilBertConfig, DistilBertModel

    model = tiny_bert() if kind == "bert" else DistilBertModel(DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
        max_position_embeddings=64)).eval()
    tokens = 10
    inputs, _, _ = sample_input(model, tokens)
    work = count_work(model, inputs)
    attention = 2 * (2 * 4 * tokens * tokens * 8)
    assert work.attention_macs == attention
    pooler = 32 * 32 if kind == "bert" else 0  # BERT's pooler reads the [CLS] token
    assert work.macs == attention + 2 * tokens * (4 * 32 * 32 + 2 * 32 * 64) + pooler
