"""ONNX export of tiny nested models: every layout and budget exported, validated against
PyTorch and reloaded from the bundle; optimum's ORTModelForCausalLM generates what PyTorch
generates; the shared layout stores each byte once; the elastic graph computes every
budget; broken bundles fail loudly."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
import torch
from conftest import char_tokenizer, tiny_bert, tiny_cnn, tiny_gpt2, tiny_llama, token_batches
from elastic_fixtures import nested_plan

from flexrank.compress.config import FactorizeConfig
from flexrank.compress.covariance import collect_covariances
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.surgery import factorize_
from flexrank.exporters import EXPORTERS, export
from flexrank.exporters.common.errors import OutputMismatchError, OutputNamesError, ShapeError
from flexrank.exporters.common.validate import torch_greedy, validate_named
from flexrank.exporters.onnx.convert import OnnxExportConfig
from flexrank.exporters.onnx.layouts import RANK_LEVEL
from flexrank.manifest import (
    MANIFEST_FILE,
    CorruptFileError,
    MissingFileError,
    load_manifest,
)
from flexrank.runtime.kv_cache import make_session, onnx_greedy

logging.getLogger("optimum").setLevel(logging.ERROR)
FRACTIONS = (0.5, 0.75, 1.0)


def elastic(build, tokenizer=None, data=True):
    model = build()
    if data:
        stats = collect_covariances(model, token_batches(100), progress=False)
        factorize_(model, stats, progress=False)
    else:
        factorize_(model, None, FactorizeConfig(method="plain"), progress=False)
    return ElasticModel(model, nested_plan(model), tokenizer=tokenizer, model_id=build.__name__)


@pytest.fixture(scope="module")
def llama():
    return elastic(tiny_llama, char_tokenizer())


def test_onnx_formats_are_registered():
    assert {"onnx", "ort"} <= set(EXPORTERS)  # other formats are tested in their own files


@pytest.mark.parametrize("layout", ["per-budget", "shared", "elastic"])
def test_llama_every_layout_validated_and_reloaded(llama, layout, tmp_path):
    manifest = export(llama, tmp_path, layout=layout)
    assert [b["beta"] for b in manifest["budgets"]] == list(FRACTIONS)
    reloaded = load_manifest(tmp_path)  # checks every sha256
    assert reloaded == manifest
    for entry in manifest["budgets"]:
        check = entry["validation"]
        assert check["generation_match"] is True
        assert check["max_abs_diff"] < 1e-4 and check["top1_agreement"] == 1.0
        assert check["outputs"][0] == "logits"
        assert entry["ranks"] == llama.layer_ranks(entry["beta"])
    if layout == "per-budget":
        forms = {b["beta"]: b["forms"] for b in manifest["budgets"]}
        assert forms[1.0] == {"dense": 14}  # β = 1: full rank is exported dense
        assert "gauge" in forms[0.5]
        half = manifest["budgets"][0]
        assert half["params"]["factorised"] == sum(
            (m + n - r) * r if form == "gauge" else m * n if form == "dense" else (m + n) * r
            for (m, n), r, form in ((tuple(x["shape"]), x["rank"], x["form"])
                                    for x in half["layers"]))
        # tied embedding stored once: no initializer equals the embedding transposed
        graph = onnx.load(tmp_path / half["graph"])
        embed = llama.model.get_input_embeddings().weight.detach().numpy()
        shapes = [tuple(i.dims) for i in graph.graph.initializer]
        assert shapes.count(embed.shape) == 1 and embed.T.shape not in shapes


def test_ort_model_for_causal_lm_generates_like_pytorch(llama, tmp_path):
    from optimum.onnxruntime import ORTModelForCausalLM

    manifest = export(llama, tmp_path, budgets=[0.5])
    folder = tmp_path / manifest["budgets"][0]["graph"].rsplit("/", 1)[0]
    ort_model = ORTModelForCausalLM.from_pretrained(folder, local_files_only=True)
    prompt = llama.tokenizer("To be, or not", return_tensors="pt")["input_ids"]
    llama.set_budget(0.5)
    with torch.no_grad():
        expected = llama.model.generate(prompt, max_new_tokens=20, min_new_tokens=20,
                                        do_sample=False)
    got = ort_model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(got, expected)


def test_shared_layout_stores_each_byte_once(llama, tmp_path):
    per_budget = export(llama, tmp_path / "pb", layout="shared", budgets=[1.0])
    manifest = export(llama, tmp_path / "all", layout="shared")
    folder = tmp_path / "all" / "shared"
    weights = (folder / "weights.bin").stat().st_size
    largest_alone = (tmp_path / "pb" / "shared" / "weights.bin").stat().st_size
    assert weights == largest_alone  # adding smaller budgets adds no weight bytes
    graph_bytes = [(folder / f"model-budget-{b:g}.onnx").stat().st_size for b in FRACTIONS]
    assert max(graph_bytes) < 200_000  # graphs without weights (tiny model: ~100 kB of nodes)
    files = manifest["files"]
    total = sum(e["bytes"] for e in files.values())
    support = sum(e["bytes"] for p, e in files.items() if not p.endswith((".onnx", ".bin")))
    assert total == weights + sum(graph_bytes) + support
    assert per_budget["budgets"][0]["validation"]["generation_match"]
    # every budget's factor is a prefix of the one block in weights.bin
    small = onnx.load(folder / "model-budget-0.5.onnx", load_external_data=False)
    big = onnx.load(folder / "model-budget-1.onnx", load_external_data=False)
    where = {i.name: {e.key: e.value for e in i.external_data} for i in big.graph.initializer}
    name = "model.layers.0.mlp.up_proj.Vt"
    small_ext = {i.name: {e.key: e.value for e in i.external_data}
                 for i in small.graph.initializer}[name]
    assert small_ext["offset"] == where[name]["offset"]
    assert int(small_ext["length"]) * 2 == int(where[name]["length"])  # rank 16 of 32


@pytest.mark.parametrize("branches", [False, True], ids=["slices", "branches"])
def test_elastic_graph_gives_each_budget(llama, tmp_path, branches):
    manifest = export(llama, tmp_path, layout="elastic",
                      config=OnnxExportConfig(elastic_branches=branches))
    graph = tmp_path / manifest["budgets"][0]["graph"]
    model = onnx.load(str(graph), load_external_data=False)
    assert sum(n.op_type == "If" for n in model.graph.node) == (1 if branches else 0)
    session = make_session(graph)
    assert RANK_LEVEL in [i.name for i in session.get_inputs()]
    prompt = llama.tokenizer("Now is the winter", return_tensors="pt")["input_ids"]
    ids = prompt.numpy()
    for level, beta in enumerate(FRACTIONS):
        llama.set_budget(beta)
        ours = onnx_greedy(session, ids, 8, {RANK_LEVEL: np.array([level])})
        assert np.array_equal(ours, torch_greedy(llama.model, prompt, 8))
        with torch.no_grad():
            reference = llama.model(input_ids=prompt).logits.numpy()
        feed = _feed(session, prompt) | {RANK_LEVEL: np.array([level])}
        logits = session.run(["logits"], feed)[0]
        np.testing.assert_allclose(logits, reference, atol=1e-3 * max(1, np.abs(reference).max()))
    assert {b["rank_level"] for b in manifest["budgets"]} == {0, 1, 2}


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_bert], ids=["gpt2", "bert"])
@pytest.mark.parametrize("layout", ["per-budget", "shared", "elastic"])
def test_gpt2_and_bert_every_layout(build, layout, tmp_path):
    em = elastic(build)
    manifest = export(em, tmp_path, layout=layout)
    load_manifest(tmp_path)
    assert len(manifest["budgets"]) == 3
    for entry in manifest["budgets"]:
        check = entry["validation"]
        assert check["max_abs_diff"] < 1e-3 * max(1.0, check["max_abs_reference"])
        if build is tiny_gpt2:
            assert manifest["kind"] == "decoder" and check["generation_match"] is True
        else:
            assert manifest["kind"] == "encoder"
            assert "last_hidden_state" in check["outputs"]


def test_generic_module_with_dynamic_axes(tmp_path):
    model = tiny_cnn()
    factorize_(model, None, FactorizeConfig(method="plain"), progress=False)
    em = ElasticModel(model, nested_plan(model), model_id="cnn")
    sample = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    manifest = export(em, tmp_path, sample_inputs=sample)
    for entry in manifest["budgets"]:
        assert entry["validation"]["max_abs_diff"] < 1e-4
        session = make_session(tmp_path / entry["graph"])
        em.set_budget(entry["beta"])
        other = torch.randn(5, 3, 8, 8)  # another batch size and image size
        with torch.no_grad():
            expected = em.model(other).numpy()
        got = session.run(None, {"input_0": other.numpy()})[0]
        np.testing.assert_allclose(got, expected, atol=1e-4)
    assert "gauge" in manifest["budgets"][0]["forms"]


def test_validation_errors_are_typed(llama, tmp_path):
    manifest = export(llama, tmp_path, budgets=[0.5], config=None)
    session = make_session(tmp_path / manifest["budgets"][0]["graph"])
    ids = torch.randint(3, 100, (1, 5))
    inputs = {"input_ids": ids}
    llama.set_budget(0.5)

    def outputs(scale=1.0, shape=None, names=None):
        def run(_):
            feed_out = session.run(None, _feed(session, ids))
            out = dict(zip([o.name for o in session.get_outputs()], feed_out, strict=True))
            out = {k: torch.from_numpy(v * scale) for k, v in out.items()}
            if shape is not None:
                out["logits"] = out["logits"][..., :shape]
            if names is not None:
                out = {names.get(k, k): v for k, v in out.items()}
            return out
        return run

    validate_named(session, outputs(), inputs, feed_extra=_feed(session, ids))
    with pytest.raises(OutputMismatchError, match="logits"):
        validate_named(session, outputs(scale=2.0), inputs, feed_extra=_feed(session, ids))
    with pytest.raises(ShapeError, match="shape"):
        validate_named(session, outputs(shape=50), inputs, feed_extra=_feed(session, ids))
    with pytest.raises(OutputNamesError):
        validate_named(session, outputs(names={"logits": "scores"}), inputs,
                       feed_extra=_feed(session, ids))


def _feed(session, ids):
    from flexrank.runtime.kv_cache import decoder_feed

    return decoder_feed(session, ids.numpy(), None, 0)


def test_missing_or_corrupt_bundle_files_fail_clearly(llama, tmp_path):
    manifest = export(llama, tmp_path, budgets=[0.5, 1.0])
    graph = tmp_path / manifest["budgets"][0]["graph"]
    data = graph.read_bytes()
    graph.write_bytes(data[:-10] + b"0123456789")
    with pytest.raises(CorruptFileError, match="budget-0.5/model.onnx"):
        load_manifest(tmp_path)
    graph.unlink()
    with pytest.raises(MissingFileError, match="budget-0.5/model.onnx"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).unlink()
    with pytest.raises(MissingFileError, match="not a finished"):
        load_manifest(tmp_path)


def test_manifest_contents(llama, tmp_path):
    manifest = export(llama, tmp_path, budgets=[0.75])
    on_disk = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert on_disk["model_id"] == "tiny_llama" and on_disk["layout"] == "per-budget"
    entry = on_disk["budgets"][0]
    assert set(entry["files"]) <= set(on_disk["files"])
    assert {"config.json", "tokenizer.json", "model.onnx"} <= {
        f.rsplit("/", 1)[1] for f in entry["files"]}
    assert on_disk["versions"]["onnxruntime"] and on_disk["versions"]["torch"]
    assert entry["bytes"] == sum(on_disk["files"][f]["bytes"] for f in entry["files"])
    assert manifest == on_disk


def peaked_llama():
    """Peaked logits, and leading blocks U[:r] with condition numbers 10 to 300 (as real
    layers have): what int8 of a gauge-fixed layer amplifies."""
    return tiny_llama(init_std=0.2)


def test_int8_factored_layers_agree_with_pytorch(tmp_path, caplog):
    # Gauge-fixed layers rebuild y[r:] = U[r:] U[:r]⁻¹ z: int8 error in z comes out
    # multiplied by cond(U[:r]). Exported gauge-fixed, β = 0.5 gave top-1 0.31 and
    # max |Δlogits| 5.6 (logits up to 4.2); plain factors give 0.98 and 0.74.
    em = elastic(peaked_llama, char_tokenizer())
    with caplog.at_level(logging.WARNING):
        manifest = export(em, tmp_path, budgets=[0.5, 1.0], quantize="int8")
    assert "pre-processing" not in caplog.text  # the graph is simplified: no such advice
    half, dense = manifest["budgets"]
    assert "plain" in half["forms"] and "gauge" not in half["forms"]
    assert {layer["form"] for layer in half["layers"]} <= {"plain", "dense"}
    for entry in manifest["budgets"]:
        assert entry["int8_float_layers"] == {}  # no outlier inputs at ratio 32 here
        assert entry["int8_float_matmuls"] == ["/lm_head/MatMul"]  # tied: a Transpose
    check, reference = half["validation"], dense["validation"]
    assert check["top1_agreement"] >= max(0.9, reference["top1_agreement"] - 0.05)
    assert check["max_abs_diff"] < 0.25 * check["max_abs_reference"]
    # the float export of the same model still gauge-fixes its factored layers
    assert "gauge" in export(em, tmp_path / "float", budgets=[0.5])["budgets"][0]["forms"]


def test_bad_arguments_are_refused(llama, tmp_path):
    with pytest.raises(ValueError, match="budget 0.3 is not one"):
        export(llama, tmp_path, budgets=[0.3])
    with pytest.raises(ValueError, match="unknown export format"):
        export(llama, tmp_path, format="tflite")
    with pytest.raises(ValueError, match="per-budget layout only"):
        export(llama, tmp_path, layout="shared", quantize="int8")


@pytest.mark.parametrize("failures", [1, 2, 3])
def test_gauge_fixed_budget_failing_validation_is_exported_again(llama, tmp_path, monkeypatch,
                                                                  failures):
    """A budget whose gauge-fixed graph misses the tolerance is re-exported with gauge
    blocks of condition ≤ 1e3, then without gauge fixing; after that the error stands."""
    import flexrank.exporters.onnx.export as onnx_exporter

    real, calls = onnx_exporter.validate_graph, []

    def flaky(elastic_model, beta, kind, graph, *args, **kwargs):
        calls.append(graph)
        if len(calls) <= failures:
            raise OutputMismatchError(f"max |Δ| too large (simulated failure {len(calls)})")
        return real(elastic_model, beta, kind, graph, *args, **kwargs)

    monkeypatch.setattr(onnx_exporter, "validate_graph", flaky)
    if failures == 3:
        with pytest.raises(OutputMismatchError, match="simulated failure 3"):
            export(llama, tmp_path, budgets=[0.5])
        assert len(calls) == 3
        return
    entry = export(llama, tmp_path, budgets=[0.5])["budgets"][0]
    fallbacks = entry["form_fallbacks"]
    assert [f["max_condition"] for f in fallbacks] == [1e4, 1e3][:failures]
    assert all(f["gauge_layers"] > 0 and "simulated" in f["error"] for f in fallbacks)
    assert entry["validation"]["generation_match"]
    if failures == 2:  # the last attempt has no gauge-fixed layer, and the bundle shows it
        assert "gauge" not in entry["forms"]
        assert entry["forms"].get("plain", 0) + entry["forms"].get("dense", 0) == len(
            entry["layers"])


def test_dense_budget_failing_validation_is_not_retried(llama, tmp_path, monkeypatch):
    import flexrank.exporters.onnx.export as onnx_exporter

    def failing(*args, **kwargs):
        raise OutputMismatchError("simulated")

    monkeypatch.setattr(onnx_exporter, "validate_graph", failing)
    with pytest.raises(OutputMismatchError):
        export(llama, tmp_path, budgets=[1.0])  # every layer dense: nothing to fall back to


def test_the_bundle_tokenizer_is_the_exporters_not_the_source_folders(tmp_path):
    """optimum copies whatever tokenizer sits at the model's config._name_or_path (for
    SmolLM2 the GGUF conversion folder, with a 98 MB slow tokenizer.model); the bundle must
    hold exactly the tokenizer files the elastic model's own tokenizer writes."""
    from flexrank.io import save_tokenizer

    source = tmp_path / "source"
    stale = char_tokenizer()
    stale.model_max_length = 7  # a tokenizer the bundle must not get,
    stale.chat_template = "{{ messages }}"  # with a file the elastic one does not write
    stale.save_pretrained(source)
    assert (source / "chat_template.jinja").is_file()
    em = elastic(tiny_llama, char_tokenizer())
    em.model.config._name_or_path = str(source)
    export(em, tmp_path / "bundle", budgets=[1.0])
    save_tokenizer(em.tokenizer, tmp_path / "expected")
    folder = tmp_path / "bundle" / "budget-1"
    for name in sorted(p.name for p in (tmp_path / "expected").iterdir()):
        assert (folder / name).read_bytes() == (tmp_path / "expected" / name).read_bytes(), name
    assert not (folder / "chat_template.jinja").exists()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["model_max_length"] != 7
    assert em.model.config._name_or_path == str(source)  # the model is left as it was


def test_an_export_says_nothing_that_tracing_always_says(tmp_path, capfd):
    """TracerWarnings from transformers' mask code, torch's aten::index note and optimum's
    tied-weights message are expected when tracing a Hugging Face decoder; they are kept
    out of the user's terminal (the export validates what they warn about)."""
    import warnings

    em = elastic(tiny_llama, char_tokenizer())
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export(em, tmp_path / "bundle", budgets=[1.0])
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    assert not [w for w in caught if "aten::index" in str(w.message)]
    assert "candidate ONNX initializers" not in capfd.readouterr().err  # optimum's own handler
