"""int4 ONNX export (`quantize="int4"`): every MatMul with a constant weight becomes
onnxruntime's block-wise 4-bit `MatMulNBits`. References:

- the graph against PyTorch running the deployed model with the weights the test decodes
  from the graph's own MatMulNBits initialisers (the contrib op's formula,
  (code − zero point) · scale per block of K, codes packed low nibble first): equal to
  float rounding, greedy tokens identical;
- round to nearest: every decoded weight within half a step of the float weight;
- the float model at the same ranks: a loose tolerance, top-1 agreement high;
- ranks: multiples of the block size (the graph's K), nested across budgets;
- bytes: 4 bits per weight plus one float32 scale per block, counted by hand.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
import torch
from conftest import char_tokenizer, token_batches
from elastic_fixtures import nested_plan
from onnx import numpy_helper

from flexrank.compress.budget_cost import budget_cost
from flexrank.compress.covariance import collect_covariances
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.select import nested_layers
from flexrank.compress.surgery import factorize_
from flexrank.exporters import export
from flexrank.exporters.common.forms import (
    DenseLinear,
    FactorLinear,
    FormPolicy,
    GaugeLinear,
    deployable_model,
    quantized_policy,
)
from flexrank.exporters.common.validate import torch_greedy
from flexrank.exporters.onnx.convert import OnnxExportConfig
from flexrank.runtime.kv_cache import decoder_feed, make_session, onnx_greedy

logging.getLogger("optimum").setLevel(logging.ERROR)
FRACTIONS = (0.4, 0.7, 1.0)
BLOCK = 32
# float32 rounding between onnxruntime's kernels and PyTorch's, relative to max |logit|
FLOAT_ROUNDING = 1e-4


def int4_llama(seed: int = 0, init_std: float = 0.02):
    """Widths multiples of 32 (hidden 128, intermediate 256, k/v 64): every layer's K is
    a whole number of blocks, and ranks have 2 to 4 block multiples to round to.
    init_std ~0.2 gives peaked logits, so that greedy tokens vary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=100, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         initializer_range=init_std)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama():
    model = int4_llama()
    factorize_(model, collect_covariances(model, token_batches(100), progress=False),
               progress=False)
    return ElasticModel(model, nested_plan(model, FRACTIONS), tokenizer=char_tokenizer(),
                        model_id="int4_llama")


@pytest.fixture(scope="module")
def exact(llama, tmp_path_factory):
    """accuracy_level 0: MatMulNBits computes in float32, so the graph equals its own
    dequantized weights to float rounding."""
    out = tmp_path_factory.mktemp("int4")
    return out, export(llama, out, quantize="int4",
                       config=OnnxExportConfig(int4_accuracy_level=0))


def dequantize(node: onnx.NodeProto, inits: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, scale, code), each (K, N): the weight a MatMulNBits node multiplies by, the
    scale of its block and its 4-bit code."""
    attrs = {a.name: a.i for a in node.attribute}
    k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
    bits = attrs.get("bits", 4)
    assert bits in (4, 8)
    blocks = -(-k // block)
    packed = numpy_helper.to_array(inits[node.input[1]]).reshape(n, blocks, block * bits // 8)
    codes = (packed if bits == 8 else
             np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, block))
    scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64).reshape(n, blocks)
    zero = np.full((n, blocks), 2.0 ** (bits - 1))  # no zero points: 2^(bits-1)
    if len(node.input) > 3 and node.input[3]:
        stored = numpy_helper.to_array(inits[node.input[3]])
        if stored.dtype == np.uint8 and bits == 4:  # two per byte, rows padded to a byte
            stored = np.stack([stored & 0x0F, stored >> 4], axis=-1).reshape(n, -1)[:, :blocks]
        zero = stored.astype(np.float64).reshape(n, blocks)
    weight = (codes - zero[..., None]) * scales[..., None]  # (N, blocks, block)
    step = np.broadcast_to(scales[..., None], weight.shape)
    return tuple(a.reshape(n, -1)[:, :k].T for a in (weight, step, codes))


def constants(graph: onnx.GraphProto) -> dict:
    """The graph's initializers, and the outputs of Transposes over them (the shared and
    elastic layouts store second factors' 4-bit tensors block-major behind a Transpose)."""
    inits = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            perm = next(a.ints for a in node.attribute if a.name == "perm")
            array = numpy_helper.to_array(inits[node.input[0]]).transpose(perm)
            inits[node.output[0]] = numpy_helper.from_array(np.ascontiguousarray(array))
    return inits


def graph_weights(path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    graph = onnx.load(str(path)).graph
    inits = constants(graph)
    return [(node.name, *dequantize(node, inits)) for node in graph.node
            if node.op_type == "MatMulNBits"]


def find_slice(weight: np.ndarray, decoded) -> tuple[np.ndarray, np.ndarray]:
    """The columns of a decoded MatMulNBits weight closest to the float `weight` (K, N):
    a fused sibling MatMul holds several layers' weights side by side."""
    best = None
    for _, values, step, codes in decoded:
        if values.shape[0] != weight.shape[0] or values.shape[1] < weight.shape[1]:
            continue
        for start in range(values.shape[1] - weight.shape[1] + 1):
            part = values[:, start:start + weight.shape[1]]
            error = float(np.abs(part - weight).max())
            if best is None or error < best[0]:
                columns = slice(start, start + weight.shape[1])
                best = (error, part, step[:, columns], codes[:, columns])
    assert best is not None, f"no MatMulNBits weight of K = {weight.shape[0]}"
    return best[1:]


def deployed_from_graph(elastic, entry, path, check_rounding: bool):
    """The deployed PyTorch model at the entry's ranks, every weight replaced by the one
    decoded from the graph (B is the transposed weight of a dense layer, Vᵀ's transpose and
    Uᵀ of a plain one)."""
    factors_only = set(entry["forms"]) == {"factors"}  # the shared and elastic layouts
    chosen = (entry.get("quantization") or {}).get("forms") or {}  # int4_form_slack
    deployed, records = deployable_model(elastic.model, entry["ranks"], factors_only,
                                         policy=quantized_policy(FormPolicy()),
                                         layer_forms={n: c["form"] for n, c in chosen.items()})
    assert [r.form for r in records] == [x["form"] for x in entry["layers"]]
    decoded = graph_weights(path)
    for record in records:
        module = deployed.get_submodule(record.name)
        params = {DenseLinear: [("weight", True)], FactorLinear: [("Vt", True), ("Ut", False)],
                  GaugeLinear: [("V_hat_t", True), ("U_rest", True)]}[type(module)]
        for name, transposed in params:
            value = getattr(module, name).detach().double().numpy()
            b = value.T if transposed else value
            part, step, codes = find_slice(b, decoded)
            if check_rounding:
                assert np.all(rounded_to_nearest(b, part, step, codes)), record.name
            new = torch.from_numpy(part.T if transposed else part).float()
            getattr(module, name).data.copy_(new)
    decoded_table = tied_table(path)
    if decoded_table is not None:  # tied: the embedding and lm_head are one Parameter
        table = deployed.get_input_embeddings().weight
        assert table is deployed.get_output_embeddings().weight
        table.data.copy_(torch.from_numpy(decoded_table).float())
    return deployed


def tied_table(path) -> np.ndarray | None:
    """The (vocab, hidden) table decoded from the lm_head's MatMulNBits, when the graph's
    embedding is a GatherBlockQuantized reading that node's codes and scales; None when
    the table is float. Asserts the two ops read the same initializers (stored once)."""
    graph = onnx.load(str(path)).graph
    gathers = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    if not gathers:
        return None
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits")
    producers = {n.output[0]: n for n in graph.node}
    read = [producers[name].input[0] if name in producers else name
            for name in gathers[0].input if name != gathers[0].input[1]]
    assert read == [name for name in head.input[1:] if name]  # codes, scales (zero points)
    weight, _, _ = dequantize(head, constants(graph))  # (hidden, vocab)
    return weight.T


def rounded_to_nearest(weight, decoded, scale, codes) -> np.ndarray:
    """Round to nearest on the block's 16-level grid: within half a step |scale| of the
    float weight, or clipped at the grid's end (code 0 or 15) with the weight beyond it,
    within a step. Symmetric RTN maps each block's largest magnitude to code 0, −8 · scale
    (so a scale may be negative), which leaves the opposite end at 7 · scale."""
    step = np.abs(scale)
    error = (weight - decoded) / np.where(scale == 0, 1.0, scale)  # in steps, along codes
    tolerance = 1e-5
    nearest = np.abs(error) <= 0.5 + tolerance
    clipped = (((codes == 15) & (error >= 0)) | ((codes == 0) & (error <= 0))) \
        & (np.abs(error) <= 1 + tolerance)
    return nearest | clipped | (step == 0)


def onnx_logits(path, ids: torch.Tensor) -> np.ndarray:
    session = make_session(path, 1)
    feed = decoder_feed(session, ids.numpy(), None, 0)
    return session.run(["logits"], feed)[0]


HELD_OUT = token_batches(100, num=1, batch=3, seq=24, seed=7)[0]["input_ids"]


def test_every_budget_equals_pytorch_with_its_decoded_weights(llama, exact):
    out, manifest = exact
    assert [e["beta"] for e in manifest["budgets"]] == list(FRACTIONS)
    for entry in manifest["budgets"]:
        path = out / entry["graph"]
        deployed = deployed_from_graph(llama, entry, path, check_rounding=True)
        with torch.no_grad():
            reference = deployed(input_ids=HELD_OUT).logits.numpy()
        got = onnx_logits(path, HELD_OUT)
        scale = max(1.0, float(np.abs(reference).max()))
        assert np.abs(got - reference).max() <= FLOAT_ROUNDING * scale, entry["beta"]
        prompt = HELD_OUT[:1, :8]
        assert np.array_equal(onnx_greedy(make_session(path, 1), prompt.numpy(), 12),
                              torch_greedy(deployed, prompt, 12))


def test_ranks_are_block_multiples_and_nested(llama, exact):
    out, manifest = exact
    max_ranks = {name: layer.max_rank for name, layer in nested_layers(llama.model).items()}
    previous = None
    for entry in manifest["budgets"]:
        ranks, plan = entry["ranks"], entry["plan_ranks"]
        assert plan == llama.layer_ranks(entry["beta"])
        for name, rank in ranks.items():
            assert rank % BLOCK == 0 or rank == max_ranks[name], (name, rank)
            # the nearest multiple of the block (or the max rank)
            assert abs(rank - plan[name]) <= BLOCK // 2 or rank == max_ranks[name]
            if previous is not None:
                assert rank >= previous[name]  # nested
        previous = ranks
        graph = onnx.load(str(out / entry["graph"])).graph
        widths = [next(a.i for a in n.attribute if a.name == "K") for n in graph.node
                  if n.op_type == "MatMulNBits"]
        assert widths and all(k % BLOCK == 0 for k in widths)
    assert manifest["budgets"][0]["ranks"] != manifest["budgets"][-1]["ranks"]


def test_manifest_records_what_was_quantized_and_bytes_are_five_bits(llama, exact):
    out, manifest = exact
    layers = set(nested_layers(llama.model))
    for entry in manifest["budgets"]:
        record = entry["quantization"]
        assert record["scheme"] == "int4" and record["block_size"] == BLOCK
        assert record["embedding_bits"] == 4  # the tied table in 4-bit blocks, stored once
        assert record["layers"] == {name: {"bits": 4, "block_size": BLOCK, "algorithm": "rtn"}
                                    for name in layers}
        assert {x["form"] for x in entry["layers"]} <= {"plain", "dense"}
        path = out / entry["graph"]
        graph = onnx.load(str(path)).graph
        inits = {init.name: init for init in graph.initializer}
        # no float weight MatMul left, not even the tied lm_head
        float_mm = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm")
                    and (n.input[1] in inits or any(
                        t.op_type == "Transpose" and t.output[0] == n.input[1]
                        and t.input[0] in inits for t in graph.node))]
        assert float_mm == record["float_matmuls"] == []
        assert not any(n.op_type == "Gather" and n.input[0] in inits for n in graph.node)
        nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
        assert sorted(n.name for n in nbits) == sorted(record["matmuls"])
        assert not any(100 * 128 in (np.prod(i.dims), np.prod(i.dims) * 8 // 5)
                       for i in inits.values() if i.data_type == onnx.TensorProto.FLOAT)
        quantized = 0
        for node in nbits:
            attrs = {a.name: a.i for a in node.attribute}
            k, n = attrs["K"], attrs["N"]
            stored = sum(numpy_helper.to_array(inits[name]).nbytes for name in node.input[1:])
            # 4 bits a weight and a float32 scale a block of 32: 5 bits, no zero points
            assert stored == k * n * 5 // 8, node.name
            assert len(node.input) == 3
            quantized += stored
        # the file holds each weight once: the 4-bit MatMul weights (the table among them)
        # and the float vectors (norms; rotary tables), nothing else of size
        rest = sum(numpy_helper.to_array(i).nbytes for i in inits.values()) - quantized
        # two RMSNorms a layer and the final one, float32 (equal ones are stored once)
        norms = 4 * 128 * (2 * 2 + 1)
        rotary = sum(numpy_helper.to_array(inits[name]).nbytes
                     for name in ("cos_cache", "sin_cache"))
        assert rotary < rest <= norms + rotary + 4096  # and shape constants
        assert path.stat().st_size <= quantized + rest + 64 * 1024  # + the graph's protobuf


def test_budget_cost_counts_five_bits_per_weight(llama):
    dense_params = sum(p.numel() for p in int4_llama().parameters())  # tied table once
    cost = budget_cost(llama, 1.0, "int4")
    assert cost.weight_bytes_total == dense_params * 5 / 8
    assert budget_cost(llama, 1.0, "none").weight_bytes_total == dense_params * 4


def test_budget_cost_counts_the_table_in_the_exports_embedding_bits(llama, tmp_path):
    """The bytes an int4 export stores (its initializers) change with --embedding-bits as
    budget_cost's total does: the tied table alone changes width."""
    stored, predicted = {}, {}
    for bits in (4, 8, 32):
        entry = export(llama, tmp_path / str(bits), budgets=[1.0], quantize="int4",
                       config=OnnxExportConfig(int4_embedding_bits=bits, validate=False))
        assert entry["budgets"][0]["quantization"]["embedding_bits"] == bits
        graph = onnx.load(str(tmp_path / str(bits) / entry["budgets"][0]["graph"])).graph
        stored[bits] = sum(numpy_helper.to_array(i).nbytes for i in graph.initializer)
        predicted[bits] = budget_cost(llama, 1.0, "int4", embedding_bits=bits).weight_bytes_total
    assert predicted[4] == budget_cost(llama, 1.0, "int4").weight_bytes_total  # the default
    table = 100 * 128  # vocab × hidden
    assert predicted[8] - predicted[4] == table * (9 - 5) / 8  # 8-bit codes, same scales
    assert stored[8] - stored[4] == predicted[8] - predicted[4]
    # float32: the Reshape constants of the quantized Gather go too (a few int64s)
    assert 0 <= (predicted[32] - predicted[4]) - (stored[32] - stored[4]) <= 64
    with pytest.raises(ValueError, match="embedding_bits 2 .* choose 4, 8 or 32"):
        budget_cost(llama, 1.0, "int4", embedding_bits=2)


def test_default_level_agrees_with_float_model(llama, tmp_path):
    """accuracy_level 4 (the default, as onnxruntime-genai's builder): activations in int8
    blocks, so close to the decoded weights' reference, and near the float model."""
    manifest = export(llama, tmp_path, budgets=[0.7], quantize="int4")
    entry = manifest["budgets"][0]
    path = tmp_path / entry["graph"]
    assert entry["quantization"]["accuracy_level"] == 4
    assert all(next(a.i for a in n.attribute if a.name == "accuracy_level") == 4
               for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits")
    got = onnx_logits(path, HELD_OUT)
    with torch.no_grad():
        decoded = deployed_from_graph(llama, entry, path, check_rounding=True)
        reference = decoded(input_ids=HELD_OUT).logits.numpy()
        layers = nested_layers(llama.model)
        previous = {name: layer.rank for name, layer in layers.items()}
        for name, rank in entry["ranks"].items():
            layers[name].rank = rank
        try:
            float_logits = llama.model(input_ids=HELD_OUT).logits.numpy()
        finally:
            for name, rank in previous.items():
                layers[name].rank = rank
    scale = float(np.abs(reference).max())
    assert np.abs(got - reference).max() <= 0.05 * scale  # int8 activations
    assert np.abs(got - float_logits).max() <= 0.25 * scale  # 4-bit weights
    assert (got.argmax(-1) == float_logits.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("block, algorithm, symmetric", [(16, "rtn", False), (64, "hqq", True)])
def test_block_sizes_and_algorithms(llama, tmp_path, block, algorithm, symmetric):
    config = OnnxExportConfig(int4_accuracy_level=0, int4_block_size=block,
                              int4_algorithm=algorithm, int4_symmetric=symmetric)
    manifest = export(llama, tmp_path, budgets=[0.7], quantize="int4", config=config)
    entry = manifest["budgets"][0]
    path = tmp_path / entry["graph"]
    assert all(rank % block == 0 or rank == nested_layers(llama.model)[name].max_rank
               for name, rank in entry["ranks"].items())
    graph = onnx.load(str(path)).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert {next(a.i for a in n.attribute if a.name == "block_size") for n in nbits} == {block}
    # zero points: asymmetric RTN, HQQ; the tied table is RTN at the config's symmetry
    assert all(len(n.input) == 4 for n in nbits if n.output[0] != "logits")
    assert [len(n.input) for n in nbits if n.output[0] == "logits"] == [3 if symmetric else 4]
    # HQQ optimises scales and zero points, so its weights need not round to nearest
    deployed = deployed_from_graph(llama, entry, path, check_rounding=algorithm == "rtn")
    with torch.no_grad():
        reference = deployed(input_ids=HELD_OUT).logits.numpy()
    got = onnx_logits(path, HELD_OUT)
    assert np.abs(got - reference).max() <= FLOAT_ROUNDING * max(1.0, np.abs(reference).max())
    assert entry["quantization"]["layers"][next(iter(entry["ranks"]))]["algorithm"] == algorithm


def test_bad_int4_options_are_refused():
    with pytest.raises(ValueError, match="int4_block_size 48 .* one of \\[16, 32, 64, 128\\]"):
        OnnxExportConfig(int4_block_size=48)
    with pytest.raises(ValueError, match="int4_algorithm 'awq'"):
        OnnxExportConfig(int4_algorithm="awq")
    with pytest.raises(ValueError, match="int4_embedding_bits 2"):
        OnnxExportConfig(int4_embedding_bits=2)
    with pytest.raises(ValueError, match="int4_form_slack 0.5"):
        OnnxExportConfig(int4_form_slack=0.5)
    with pytest.raises(ValueError, match="int4_accuracy_level 7"):
        OnnxExportConfig(int4_accuracy_level=7)


def test_budgets_that_rounding_merges_are_warned_about(tmp_path, caplog):
    """A new user's tiny model: rounding ranks to blocks of 32 gave β 0.4 and 0.6 one and
    the same file under two labels, with nothing said."""
    from flexrank.exporters.onnx.export import warn_merged_budgets

    with caplog.at_level(logging.WARNING, logger="flexrank.exporters.onnx.export"):
        warn_merged_budgets({0.4: {"a": 32, "b": 32}, 0.6: {"a": 32, "b": 32},
                             0.8: {"a": 64, "b": 32}}, 32)
    assert caplog.text.count("become the same model") == 1
    assert "budgets 0.4 and 0.6 become the same model" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flexrank.exporters.onnx.export"):
        warn_merged_budgets({0.4: {"a": 32}, 0.6: {"a": 64}}, 32)
    assert "same model" not in caplog.text
