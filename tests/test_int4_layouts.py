"""int4 in the shared and elastic layouts (issue 15): the 4-bit blocks of a rank prefix are
a prefix of the blocks (first factors: the rank is MatMulNBits' outer axis N; second
factors: stored block-major, exporters/onnx/int4_layouts.py). References: each shared
graph against PyTorch running the weights decoded from that graph (tests/test_int4.py's
decoder of the contrib op), greedy tokens through ElasticSession; the elastic graph at
each level against the shared graph of that budget; weights.bin against the bytes of the
largest budget's tensors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from test_int4 import (
    FLOAT_ROUNDING,
    FRACTIONS,
    HELD_OUT,
    deployed_from_graph,
    llama,  # noqa: F401  (the module fixture)
    onnx_logits,
)

from flexrank.exporters import export
from flexrank.exporters.common.validate import torch_greedy
from flexrank.exporters.onnx.convert import OnnxExportConfig
from flexrank.formats import RANK_LEVEL
from flexrank.runtime.kv_cache import decoder_feed, make_session
from flexrank.runtime.session import ElasticSession

EXACT = OnnxExportConfig(int4_accuracy_level=0)  # MatMulNBits in float32


@pytest.fixture(scope="module")
def shared(llama, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("int4_shared")
    return out, export(llama, out, layout="shared", quantize="int4", config=EXACT)


def test_shared_budgets_equal_pytorch_with_their_decoded_weights(llama, shared):  # noqa: F811
    out, manifest = shared
    assert [e["beta"] for e in manifest["budgets"]] == list(FRACTIONS)
    prompt = HELD_OUT[:1, :8]
    for entry in manifest["budgets"]:
        path = out / entry["graph"]
        assert entry["quantization"]["embedding_bits"] == 4
        deployed = deployed_from_graph(llama, entry, path, check_rounding=True)
        with torch.no_grad():
            reference = deployed(input_ids=HELD_OUT).logits.numpy()
        got = onnx_logits(path, HELD_OUT)
        assert np.abs(got - reference).max() <= FLOAT_ROUNDING * max(1.0, np.abs(reference).max())
        with torch.no_grad():
            expected = torch_greedy(deployed, prompt, 12)[0].tolist()
        session = ElasticSession(out, budget=entry["beta"], threads=1)
        generated = session.generate(prompt.numpy(), max_new_tokens=12, stop_at_eos=False)
        assert generated.token_ids == expected


def test_shared_weights_hold_each_block_once(shared):
    """weights.bin is the largest budget's tensors (plus 64-byte alignment), not the sum
    over budgets: the smaller budgets point at prefixes of the same blocks."""
    out, manifest = shared
    sizes = []
    for entry in manifest["budgets"]:
        graph = onnx.load(str(out / entry["graph"]), load_external_data=False).graph
        sizes.append(sum(int({e.key: e.value for e in i.external_data}["length"])
                         for i in graph.initializer
                         if i.data_location == onnx.TensorProto.EXTERNAL))
    stored = (out / "shared" / "weights.bin").stat().st_size
    largest = max(sizes)
    assert largest <= stored <= largest + 64 * len(graph.initializer)
    assert sum(sizes) > 1.5 * stored


def test_elastic_levels_equal_the_shared_budgets(llama, shared, tmp_path):  # noqa: F811
    out, shared_manifest = shared
    manifest = export(llama, tmp_path, layout="elastic", quantize="int4", config=EXACT)
    path = tmp_path / manifest["budgets"][0]["graph"]
    session = make_session(path, 1)
    for level, (entry, twin) in enumerate(zip(manifest["budgets"], shared_manifest["budgets"],
                                              strict=True)):
        assert entry["rank_level"] == level and entry["ranks"] == twin["ranks"]
        feed = decoder_feed(session, HELD_OUT.numpy(), None, 0)
        feed[RANK_LEVEL] = np.array([level], np.int64)
        got = session.run(["logits"], feed)[0]
        reference = onnx_logits(out / twin["graph"], HELD_OUT)
        assert np.abs(got - reference).max() <= FLOAT_ROUNDING * max(1.0, np.abs(reference).max())
    prompt = HELD_OUT[:1, :8].numpy()
    for beta in (FRACTIONS[0], FRACTIONS[-1]):
        ours = ElasticSession(tmp_path, budget=beta, threads=1).generate(
            prompt, max_new_tokens=12, stop_at_eos=False).token_ids
        theirs = ElasticSession(out, budget=beta, threads=1).generate(
            prompt, max_new_tokens=12, stop_at_eos=False).token_ids
        assert ours == theirs


@pytest.mark.parametrize("options", [dict(int4_algorithm="hqq"), dict(int4_algorithm="gptq"),
                                     dict(int4_symmetric=False)])
def test_options_without_prefix_blocks_are_refused(llama, tmp_path, options):  # noqa: F811
    with pytest.raises(ValueError, match="is not a prefix of the blocks"):
        export(llama, tmp_path, layout="shared", quantize="int4",
               config=OnnxExportConfig(**options))
