"""`flexrank-export --quantize` offers each format's quantizations (issue 16): onnx/ort
none, int8, int4; executorch none, 8da4w. A choice that does not fit the format is
refused by name before anything is loaded; 8da4w from the command line gives an
ExecuTorch bundle whose program holds 4-bit weights."""

from __future__ import annotations

import json

import pytest

from flexrank.cli import export_main
from flexrank.exporters.executorch.validate import constant_methods


@pytest.mark.parametrize("fmt, quantize, offered", [
    ("executorch", "int8", "--quantize none, 8da4w"),
    ("executorch", "int4", "--quantize none, 8da4w"),
    ("onnx", "8da4w", "--quantize none, int8, int4"),
    ("ort", "8da4w", "--quantize none, int8, int4"),
])
def test_a_quantization_the_format_lacks_is_named(tmp_path, capsys, fmt, quantize, offered):
    missing = tmp_path / "no-such-model"  # refused before the model is looked for
    assert export_main([str(missing), "--format", fmt, "--quantize", quantize, "--budget",
                        "1", "-o", str(tmp_path / "dist")]) == 2
    err = capsys.readouterr().err
    assert f"--quantize {quantize} does not fit --format {fmt}" in err
    assert offered in err
    assert "no-such-model" not in err
    assert not (tmp_path / "dist").exists()


def test_help_names_each_formats_quantizations(capsys):
    with pytest.raises(SystemExit):
        export_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{none,int8,int4,8da4w}" in text
    assert "executorch: 8da4w" in text


def test_8da4w_from_the_command_line(checkpoint, tmp_path, capsys):
    """A real export of the tiny checkpoint: the manifest says 8da4w, the decision's
    weight bytes are the 4-bit ones, and the program is smaller than the float one."""
    sizes = {}
    for quantize in ("none", "8da4w"):
        out = tmp_path / quantize
        assert export_main([str(checkpoint), "--format", "executorch", "--quantize", quantize,
                            "--budget", "1", "-o", str(out)]) == 0, capsys.readouterr().err
        manifest = json.loads((out / "flexrank-manifest.json").read_text())
        assert manifest["quantize"] == (None if quantize == "none" else "8da4w")
        (entry,) = manifest["budgets"]
        program = entry["program"]  # the float tied table's weights are in model.ptd
        sizes[quantize] = program["bytes"] + program.get("data_bytes", 0)
        assert sizes[quantize] == sum((out / f).stat().st_size for f in entry["files"]
                                      if f.endswith((".pte", ".ptd")))
        cost = manifest["budget_costs"][-1]
        sizes[quantize, "cost"] = cost["weight_bytes_total"]
        # stage 4 ran the program in ExecuTorch's runtime, within its static KV cache
        host = manifest["host_latency"]
        assert host["runtime"] == "executorch" and host["decode_ms_median"] > 0, host
        max_len = constant_methods(out / entry["graph"])["get_max_seq_len"]
        assert host["prompt_tokens"] >= 1 and \
            host["prompt_tokens"] + host["new_tokens"] < max_len, (host, max_len)
    # the decision's size: every weight at 4.5 bits (4-bit codes, a bf16 scale per 32), and
    # the tied table once more as ExecuTorch stores the input embedding: 8 bits per weight
    # and a float32 scale per row (SmolLM2 β 1: 99.3 MiB counted, 100.3 MiB in the program)
    from flexrank.compress.elastic import ElasticModel

    model = ElasticModel.from_pretrained(checkpoint).model
    table = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is table  # tied
    vocab, hidden = table.shape
    embedding_bytes = vocab * hidden + 4 * vocab
    assert sizes["8da4w", "cost"] == pytest.approx(sizes["none", "cost"] * 4.5 / 32
                                                   + embedding_bytes)
    assert sizes["8da4w"] < sizes["none"]


def test_a_profiles_context_is_the_context_shipped(checkpoint, tmp_path, capsys):
    """The decision counts the KV cache for the profile's context_tokens; the bundle holds
    that many positions: ExecuTorch's static cache (`get_max_seq_len`, read by ExecuTorch's
    runtime) and onnxruntime-genai's max_length (og's generator stops there)."""
    import numpy as np
    import onnxruntime_genai as og
    import yaml

    from flexrank.device_profiles import PROFILE_DIR
    from flexrank.runtime.kv_cache import make_session, onnx_greedy

    raw = yaml.safe_load((PROFILE_DIR / "pixel8.yaml").read_text())
    raw |= {"name": "short-context-phone", "context_tokens": 96}  # the model has 128
    profile = tmp_path / "short-context-phone.yaml"
    profile.write_text(yaml.safe_dump(raw))
    common = [str(checkpoint), "--profile", str(profile), "--budget", "1", "--quantize", "none"]
    et = tmp_path / "et"
    assert export_main([*common, "--format", "executorch", "-o", str(et)]) == 0, \
        capsys.readouterr().err
    (entry,) = json.loads((et / "flexrank-manifest.json").read_text())["budgets"]
    assert constant_methods(et / entry["graph"])["get_max_seq_len"] == 96
    onnx = tmp_path / "onnx"
    assert export_main([*common, "--format", "onnx", "-o", str(onnx)]) == 0, \
        capsys.readouterr().err
    (entry,) = json.loads((onnx / "flexrank-manifest.json").read_text())["budgets"]
    graph = onnx / entry["graph"]
    config = json.loads(graph.with_name("genai_config.json").read_text())
    assert config["search"]["max_length"] == 96 and config["model"]["context_length"] == 128
    model = og.Model(str(graph.parent))
    generator = og.Generator(model, og.GeneratorParams(model))  # the folder's defaults
    prompt = np.array([[5, 17, 42, 9]], np.int64)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    reference = [int(t) for t in onnx_greedy(make_session(graph, 1), prompt, 92).reshape(-1)]
    assert tokens == reference[:len(tokens)]
    assert len(tokens) == 92 or tokens[-1] == 2  # stopped at 96 positions, or at eos
