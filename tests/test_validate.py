"""`validate_decoder` against hand-made mismatches: a tiny Llama exported once by optimum,
its onnxruntime session run unchanged (no error, the report's numbers equal this test's own
comparison) and through a wrapper that tampers with what the graph returns, or against the
model changed after export; each mismatch raises its typed error with the right numbers."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
from conftest import tiny_llama

from flexrank.exporters.common.errors import (
    GenerationMismatchError,
    OutputMismatchError,
    OutputNamesError,
    ShapeError,
)
from flexrank.exporters.common.validate import (
    DEFAULT_TOLERANCE,
    GENERATION_TOKENS,
    validate_decoder,
)
from flexrank.runtime.kv_cache import make_session

logging.getLogger("optimum").setLevel(logging.ERROR)
IDS = torch.tensor([[5, 17, 42, 8, 99], [3, 3, 60, 71, 12]])  # (B, T) = (2, 5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(PyTorch model, onnxruntime session of its KV-cache graph)."""
    from optimum.exporters.onnx import onnx_export_from_model

    model = tiny_llama(init_std=0.2)  # peaked logits: greedy tokens are not near-ties
    folder = tmp_path_factory.mktemp("decoder")
    onnx_export_from_model(model, folder, task="text-generation-with-past", do_validation=False)
    return model, make_session(folder / "model.onnx")


class Tampered:
    """`session` with its outputs renamed by `names` and each run's {name: array} passed
    through `change(call, outputs)` (call 0 is the validation run, then one per greedy
    token)."""

    def __init__(self, session, change=None, names=None):
        self.session, self.change, self.names, self.calls = session, change, names or {}, 0

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return [type("Output", (), {"name": self.names.get(o.name, o.name)})()
                for o in self.session.get_outputs()]

    def run(self, output_names, feed):
        outputs = dict(zip([o.name for o in self.session.get_outputs()],
                           self.session.run(output_names, feed), strict=True))
        if self.change is not None:
            self.change(self.calls, outputs)
        self.calls += 1
        return list(outputs.values())


def by_hand(session, model, ids: torch.Tensor) -> tuple[dict, dict]:
    """({name: graph output}, {name: PyTorch output}) for `ids` with an empty cache, the
    feed built here from the graph's declared inputs."""
    batch, length = ids.shape
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((batch, length), np.int64),
            "position_ids": np.tile(np.arange(length), (batch, 1))}
    for graph_input in session.get_inputs():
        if graph_input.name.startswith("past_key_values."):
            _, heads, _, head_dim = graph_input.shape
            feed[graph_input.name] = np.zeros((batch, heads, 0, head_dim), np.float32)
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, feed), strict=True))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    expected = {"logits": out.logits.numpy()}
    for i, layer in enumerate(out.past_key_values.layers):
        expected[f"present.{i}.key"] = layer.keys.numpy()
        expected[f"present.{i}.value"] = layer.values.numpy()
    return got, expected


def max_abs_diff(got: dict, expected: dict) -> float:
    return max(float(np.abs(got[k].astype(np.float64) - expected[k]).max()) for k in expected)


def greedy_by_hand(model, prompt: torch.Tensor) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=GENERATION_TOKENS, min_new_tokens=GENERATION_TOKENS,
                             pad_token_id=2)
    return out[:, prompt.shape[1]:].tolist()


def test_unchanged_pair_passes_with_the_numbers_computed_here(exported):
    model, session = exported
    report = validate_decoder(session, model, IDS)
    got, expected = by_hand(session, model, IDS)
    assert set(report.outputs) == set(expected) and report.outputs[0] == "logits"
    assert report.max_abs_diff == pytest.approx(max_abs_diff(got, expected), rel=1e-12)
    assert report.max_abs_diff < DEFAULT_TOLERANCE
    scale = max(max(1.0, float(np.abs(v).max())) for v in expected.values())
    assert report.max_abs_reference == pytest.approx(scale, rel=1e-12)
    agreement = float((got["logits"].argmax(-1) == expected["logits"].argmax(-1)).mean())
    assert report.top1_agreement == agreement == 1.0
    assert report.generation_match is True


def test_perturbed_logits_are_an_output_mismatch_with_its_numbers(exported):
    model, session = exported
    got, expected = by_hand(session, model, IDS)
    scale = max(1.0, float(np.abs(expected["logits"]).max()))
    delta = 10 * DEFAULT_TOLERANCE * scale

    def nudge(call, outputs):
        if call == 0:
            outputs["logits"][1, 3, 7] += delta

    nudged = got["logits"].copy()
    nudged[1, 3, 7] += delta
    diff = float(np.abs(nudged.astype(np.float64) - expected["logits"]).max())
    message = (f"output 'logits': max |Δ| {diff:.3g} exceeds {DEFAULT_TOLERANCE:g} × "
               f"{scale:.3g}")
    with pytest.raises(OutputMismatchError, match=re.escape(message)):
        validate_decoder(Tampered(session, nudge), model, IDS)
    # not strict: reported, not raised
    report = validate_decoder(Tampered(session, nudge), model, IDS, strict_values=False,
                              generate=False)
    assert report.max_abs_diff == pytest.approx(diff, rel=1e-12)
    assert report.generation_match is None
    # a difference inside the tolerance passes
    small = 0.1 * DEFAULT_TOLERANCE * scale

    def within(call, outputs):
        outputs["logits"][0, 0, 0] += small if call == 0 else 0.0

    validate_decoder(Tampered(session, within), model, IDS, generate=False)


def test_model_changed_after_export_is_an_output_mismatch(exported):
    model, session = exported
    changed = tiny_llama(init_std=0.2)
    with torch.no_grad():
        changed.model.norm.weight.mul_(1.05)  # every logit moves by ~5 %
    got, expected = by_hand(session, changed, IDS)
    diff = float(np.abs(got["logits"].astype(np.float64) - expected["logits"]).max())
    scale = max(1.0, float(np.abs(expected["logits"]).max()))
    assert diff > DEFAULT_TOLERANCE * scale
    with pytest.raises(OutputMismatchError, match=re.escape(f"max |Δ| {diff:.3g} exceeds")):
        validate_decoder(session, changed, IDS)


def test_dropped_position_is_a_shape_error(exported):
    model, session = exported

    def drop_last(call, outputs):
        outputs["logits"] = outputs["logits"][:, :-1]

    with pytest.raises(ShapeError, match=re.escape(
            "output 'logits' has shape (2, 4, 100), PyTorch gives (2, 5, 100)")):
        validate_decoder(Tampered(session, drop_last), model, IDS)


def test_renamed_output_is_an_output_names_error(exported):
    model, session = exported
    with pytest.raises(OutputNamesError, match=r"decoder graph outputs \['scores', "):
        validate_decoder(Tampered(session, names={"logits": "scores"}), model, IDS)


def test_other_greedy_tokens_are_a_generation_mismatch(exported):
    model, session = exported
    theirs = greedy_by_hand(model, IDS[:1])

    def force_token(call, outputs):
        if call == 3:  # the second decode step of the greedy run picks another token
            logits = outputs["logits"][:, -1]
            logits[:, (theirs[0][2] + 1) % logits.shape[-1]] = 1e4

    first, second, forced = theirs[0][0], theirs[0][1], (theirs[0][2] + 1) % 100
    with pytest.raises(GenerationMismatchError, match=re.escape(f" vs {theirs}")) as raised:
        validate_decoder(Tampered(session, force_token), model, IDS)
    assert str(raised.value).startswith(
        f"greedy generation differs from PyTorch's: [[{first}, {second}, {forced}, ")
    report = validate_decoder(Tampered(session, force_token), model, IDS, strict_values=False)
    assert report.generation_match is False and report.max_abs_diff < DEFAULT_TOLERANCE
