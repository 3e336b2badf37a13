"""`flexrank-export --budget auto` over (β, precision) on a tiny Llama checkpoint kept as
`flexrank compress` keeps it (elastic/ beside stages/calibration.safetensors): quality is
measured once, stored with the checkpoint and read back; the user's constraints change
the decision; an unmeetable one exits non-zero; the artifact follows the runtime."""

from __future__ import annotations

import argparse
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from flexrank.cli import export as cli_export
from flexrank.cli import export_main
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.quality import QUALITY_FILE
from flexrank.exporters import Format


@pytest.fixture(scope="module")
def work(checkpoint, tmp_path_factory):
    """A compress-style folder: work/elastic (the tiny checkpoint) and work/stages with
    held-out sequences (2 × 16 tokens)."""
    folder = tmp_path_factory.mktemp("work")
    shutil.copytree(checkpoint, folder / "elastic")
    (folder / "stages").mkdir()
    held = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(5))
    save_file({"train": held[:1].clone(), "eval": held}, str(folder / "stages" /
                                                     "calibration.safetensors"))
    return folder


def test_quality_is_measured_once_stored_and_read_back(work, capsys):
    quality = work / "elastic" / QUALITY_FILE
    assert export_main([str(work / "elastic"), "--profile", "laptop-x86", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "quality (held-out perplexity, KL to the original): measured now" in out
    stored = json.loads(quality.read_text())
    pairs = {(r["beta"], r["precision"]) for r in stored["rows"]}
    assert pairs == {(b, p) for b in (0.6, 0.8, 1.0) for p in ("fp32", "int8", "int4")}
    assert stored["text"]["sequences"] == 2 and stored["text"]["tokens_per_sequence"] == 16
    # the fp32 figure against this test's own perplexity of the same held-out tokens
    elastic = ElasticModel.from_pretrained(work / "elastic").set_budget(0.8)
    ids = load_file(str(work / "stages" / "calibration.safetensors"))["eval"]
    with torch.no_grad():
        logits = elastic.model(input_ids=ids).logits  # (2, 16, V)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                          ids[:, 1:].reshape(-1))
    row = next(r for r in stored["rows"] if (r["beta"], r["precision"]) == (0.8, "fp32"))
    assert row["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-5)
    # quantization costs quality on this random model: int4 is worse than fp32 at β 1
    by = {(r["beta"], r["precision"]): r["ppl"] for r in stored["rows"]}
    assert by[1.0, "int4"] != by[1.0, "fp32"]
    # the table shows the measured perplexity next to the prediction
    assert f"{by[1.0, 'fp32']:.4g}" in out
    # a second run reads the file instead of measuring
    before = quality.stat().st_mtime_ns
    assert export_main([str(work / "elastic"), "--profile", "laptop-x86", "--dry-run"]) == 0
    assert f"stored in {quality}" in capsys.readouterr().out
    assert quality.stat().st_mtime_ns == before
    # a budget fixed by hand: the table labels the profile's choice as --budget auto's
    assert export_main([str(work / "elastic"), "--profile", "laptop-x86", "--dry-run",
                        "--budget", "0.6"]) == 0
    out = capsys.readouterr().out
    assert "Chosen:" not in out and "<- chosen" not in out and "<- auto's choice" in out
    assert "--budget auto would choose: β " in out
    assert "You asked for β 0.6: that is what is exported." in out


def test_each_user_constraint_reaches_the_decision(work, capsys):
    base = [str(work / "elastic"), "--profile", "server-x86", "--dry-run"]
    assert export_main(base) == 0
    assert "(profile server-x86)" in capsys.readouterr().out
    for flag, value, target in (("--max-size", "1e-4", "size"), ("--max-memory", "1e-6",
                                                                 "memory"),
                                ("--min-decode", "1e9", "decode"), ("--max-ttft", "1e-9",
                                                                    "TTFT")):
        assert export_main([*base, flag, value]) == 1, flag
        err = capsys.readouterr().err
        assert f"No candidate meets every target on server-x86: {target} " in err, flag
        assert "short by" in err and "%" in err, flag
    # a size limit between the fp32 and the 4-bit sizes moves the choice off fp32
    assert export_main([*base, "--quality-tolerance", "0", "--max-size", "0.05"]) == 0
    out = capsys.readouterr().out
    chosen = out.split("Chosen: ")[1].split(".")[0:2]
    assert "fp32" not in ".".join(chosen) and "(--max-size)" in out


def test_bad_constraints_are_refused(work, capsys):
    base = [str(work / "elastic"), "--profile", "server-x86", "--dry-run"]
    for argv, message in ((["--max-size", "-3"], "--max-size: -3.0 is out of range: must be > 0"),
                          (["--quality-tolerance", "2"],
                           "--quality-tolerance 2: must be in [0, 1)")):
        with pytest.raises(SystemExit) as exited:  # argparse's usage error
            export_main([*base, *argv])
        assert exited.value.code == 2 and message in capsys.readouterr().err
    assert export_main([*base, "--precision", "8da4w"]) == 2
    assert "--precision 8da4w: server-x86 runs onnxruntime, which ships fp32, int8, int4; " \
        "choose one of those, or add --format" in capsys.readouterr().err
    assert export_main([*base, "--precision", "int8", "--quantize", "int4"]) == 2
    assert "--quantize int4 and --precision int8 disagree" in capsys.readouterr().err


def job_for(argv):
    parser = argparse.ArgumentParser()
    cli_export.add_export_args(parser)
    return cli_export._checked_job(parser.parse_args([*argv, "--dry-run"]))


def test_the_artifact_follows_the_runtime(checkpoint):
    # pixel8 runs ExecuTorch and onnxruntime-genai: the decision weighs both runtimes'
    # precisions, and the format follows the one that ships the chosen precision
    pixel8 = job_for([str(checkpoint), "--profile", "pixel8"])
    assert pixel8.precisions == ("fp32", "8da4w", "int8", "int4")
    assert pixel8.formats == {"fp32": Format.EXECUTORCH, "8da4w": Format.EXECUTORCH,
                              "int8": Format.ONNX, "int4": Format.ONNX}
    assert pixel8.profile.also_runs  # the whole profile reaches the decision
    for precision, fmt, runtime in (("int4", Format.ONNX, "onnxruntime"),
                                    ("8da4w", Format.EXECUTORCH, "executorch"),
                                    ("fp32", Format.EXECUTORCH, "executorch")):
        shipped = pixel8.shipping(precision)
        assert shipped.format == fmt and shipped.profile.runtime == runtime
        assert shipped.profile.also_runs == () and shipped.formats is None
    executorch_only = job_for([str(checkpoint), "--profile", "pixel8", "--format", "executorch"])
    assert executorch_only.format == Format.EXECUTORCH
    assert executorch_only.precisions == ("fp32", "8da4w") and executorch_only.formats is None
    assert executorch_only.profile.runtimes() == [("executorch", "xnnpack")]
    int4 = job_for([str(checkpoint), "--profile", "pixel8", "--precision", "int4"])
    assert int4.format == Format.ONNX and int4.profile.runtime == "onnxruntime"
    assert int4.precisions == ("int4",)
    # ExecuTorch has the per-budget layout only: an elastic bundle for pixel8 is onnx
    elastic = job_for([str(checkpoint), "--profile", "pixel8", "--layout", "elastic"])
    assert elastic.format == Format.ONNX and elastic.profile.runtime == "onnxruntime"
    assert elastic.precisions == ("fp32",)


def test_a_runtime_not_installed_is_left_out(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(cli_export, "_runtime_installed", lambda fmt: fmt != Format.EXECUTORCH)
    pixel8 = job_for([str(checkpoint), "--profile", "pixel8"])
    assert pixel8.format == Format.ONNX and pixel8.formats is None
    assert pixel8.precisions == ("fp32", "int8", "int4")
    assert pixel8.profile.runtimes() == [("onnxruntime", "cpu")]
    assert "pixel8's default runtime is executorch, which is not installed, so onnxruntime " \
        "ships (onnx)" in capsys.readouterr().out
    laptop = job_for([str(checkpoint), "--profile", "laptop-x86"])
    assert laptop.format == Format.ONNX and laptop.precisions == ("fp32", "int8", "int4")
    onnx_on_phone = job_for([str(checkpoint), "--profile", "pixel8", "--format", "onnx"])
    assert onnx_on_phone.profile.runtime == "onnxruntime"  # the shipped runtime is predicted
    assert onnx_on_phone.precisions == ("fp32", "int8", "int4")
    fixed = job_for([str(checkpoint), "--profile", "pixel8", "--precision", "8da4w"])
    assert fixed.precisions == ("8da4w",) and str(fixed.quantize) == "8da4w"
    plain = job_for([str(checkpoint), "--budget", "1"])
    assert plain.format == Format.ONNX and plain.precisions == ("fp32",)


def test_export_ships_the_decision_and_bench_plots_each_tiers_choice(work, tmp_path, capsys):
    from flexrank.cli import main
    from flexrank.manifest import load_manifest

    dist = tmp_path / "dist"
    assert export_main([str(work / "elastic"), "--profile", "laptop-x86", "-o", str(dist)]) == 0
    out = capsys.readouterr().out
    decision = load_manifest(dist)["profiles"]["laptop-x86"]
    beta, precision = decision["chosen_beta"], decision["chosen_precision"]
    assert f"bundle: {dist} (β {beta:g} {precision}, onnx, for laptop-x86)" in out
    manifest = load_manifest(dist)
    assert manifest["quantize"] == (None if precision == "fp32" else precision)
    assert [b["beta"] for b in manifest["budgets"]] == [beta]
    # every candidate the decision weighed is in the manifest with its quality and cost
    rows = decision["budgets"]
    assert {(r["beta"], r["precision"]) for r in rows} == \
        {(b, p) for b in (0.6, 0.8, 1.0) for p in ("fp32", "int8", "int4")}
    assert all(r["quality"]["ppl"] > 1 and r["cost"]["weight_bytes_total"] > 0 for r in rows)
    # the rule, checked on the stored figures: the chosen one fits, and no fitting candidate
    # is better than the tolerance allows
    chosen = next(r for r in rows if r["chosen"])
    best = min(r["quality"]["ppl"] for r in rows if r["fits"])
    assert chosen["fits"] and chosen["quality"]["ppl"] <= best * 1.01 + 1e-9
    assert main(["bench", str(dist), "--profiles", "laptop-x86,pi-zero-2w", "--tokens",
                 "2"]) == 0
    out = capsys.readouterr().out
    assert "laptop-x86 (onnxruntime): β" in out and "pi-zero-2w (onnxruntime)" in out
    report = json.loads((dist / "bench" / "bench.json").read_text())
    for tier in report["tiers"]:
        marked = [c for c in tier["decision"]["candidates"] if c["chosen"]]
        assert len(marked) <= 1 and all(c["fits"] for c in marked), tier["profile"]
    laptop = report["tiers"][0]["decision"]
    assert (laptop["chosen_beta"], laptop["chosen_precision"]) == (beta, precision)
    assert (dist / "bench" / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_embedding_bits_reach_the_sizes_the_decision_weighs(work, capsys):
    """--embedding-bits sets the int4 table's bits in the candidates' sizes: a --max-size
    between β 1 int4's size with a 4-bit table and with an 8-bit one lets it ship in the
    first case only (sizes from the export's byte count, tests/test_int4.py)."""
    from flexrank.compress.budget_cost import budget_cost

    elastic = ElasticModel.from_pretrained(work / "elastic")
    sizes = {bits: budget_cost(elastic, 1.0, "int4", bits).weight_bytes_total / 1e6
             for bits in (4, 8)}
    assert sizes[4] < sizes[8]
    limit = f"{(sizes[4] + sizes[8]) / 2:.6f}"
    base = [str(work / "elastic"), "--profile", "server-x86", "--dry-run", "--precision",
            "int4", "--max-size", limit]
    fits = {}
    for bits in (4, 8):
        assert export_main([*base, "--embedding-bits", str(bits)]) == 0
        row = next(line.split() for line in capsys.readouterr().out.splitlines()
                   if line.split()[:2] == ["1", "int4"])
        fits[bits] = row[-2]  # the "fits" column (the last is "whole kept")
    assert fits == {4: "yes", 8: "no"}, fits


def test_a_phone_with_two_runtimes_ships_the_winners_format(work, tmp_path, capsys,
                                                          slower_onnxruntime):
    """pixel8 runs ExecuTorch and onnxruntime-genai: with int4 β 1 the best measured
    quality, `--budget auto` ships an ONNX folder that onnxruntime-genai loads and
    generates from; with 8da4w β 1 the best, the decision picks the ExecuTorch program."""
    import onnxruntime_genai as og

    from flexrank.cli import main
    from flexrank.device.predict import efficiency_for, predict
    from flexrank.device.profiles import load_profile
    from flexrank.manifest import load_manifest
    from flexrank.planning.costs import BudgetCost
    from flexrank.runtime.session import ElasticSession
    # slower_onnxruntime: the runtimes' factors differ, so a mix-up shows

    folder = tmp_path / "work"
    shutil.copytree(work, folder)
    quality = folder / "elastic" / QUALITY_FILE
    assert export_main([str(folder / "elastic"), "--profile", "pixel8", "--dry-run"]) == 0
    capsys.readouterr()
    stored = json.loads(quality.read_text())
    assert {(r["beta"], r["precision"]) for r in stored["rows"]} == \
        {(b, p) for b in (0.6, 0.8, 1.0) for p in ("fp32", "8da4w", "int8", "int4")}

    def best(winner):  # every other candidate 2x worse than the winner
        for row in stored["rows"]:
            row["ppl"] = 50.0 if (row["beta"], row["precision"]) == winner else 100.0
        quality.write_text(json.dumps(stored))

    best((1.0, "8da4w"))
    assert export_main([str(folder / "elastic"), "--profile", "pixel8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Chosen: β 1 8da4w. β 1 8da4w (ppl 50" in out and "ships on pixel8, in executorch" in out

    best((1.0, "int4"))
    dist = tmp_path / "dist"
    assert export_main([str(folder / "elastic"), "--profile", "pixel8", "-o", str(dist)]) == 0
    out = capsys.readouterr().out
    assert "ships on pixel8, in onnxruntime." in out
    assert f"bundle: {dist} (β 1 int4, onnx, for pixel8)" in out
    manifest = load_manifest(dist)
    assert str(manifest["export_format"]) == "onnx" and manifest["quantize"] == "int4"
    decision = manifest["profiles"]["pixel8"]
    assert (decision["chosen_precision"], decision["chosen_runtime"]) == ("int4", "onnxruntime")
    assert decision["runtimes"] == ["executorch/xnnpack", "onnxruntime/cpu"]
    shipped = manifest["predicted_device_latency"]
    assert (shipped["runtime"], shipped["backend"]) == ("onnxruntime", "cpu")
    # the prediction shipped is onnxruntime's, as the decision priced int4
    chosen = next(b for b in decision["budgets"] if b["chosen"])
    predicted = next(b for b in manifest["predicted_device_latency"]["budgets"]
                     if b["beta"] == 1.0)
    pixel8, cost = load_profile("pixel8"), BudgetCost(**chosen["cost"])
    rates = {rt: predict(cost, pixel8.running(rt), efficiency_for(pixel8.running(rt), "int4")
                         if rt == "onnxruntime" else efficiency_for(pixel8.running(rt), "8da4w")
                         ).decode_tokens_per_s for rt in ("onnxruntime", "executorch")}
    assert rates["onnxruntime"] != pytest.approx(rates["executorch"])
    assert predicted["decode_tokens_per_s"] == pytest.approx(rates["onnxruntime"])
    budget_dir = dist / "budget-1"
    assert (budget_dir / "genai_config.json").is_file() and not list(dist.rglob("*.pte"))
    model = og.Model(str(budget_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=12, do_sample=False)
    generator = og.Generator(model, params)
    prompt = [5, 17, 42, 9]
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    ours = ElasticSession(dist).generate(prompt, max_new_tokens=len(tokens), stop_at_eos=False)
    assert tokens == list(ours.token_ids) and (len(tokens) == 8 or tokens[-1] == 2)
    # flexrank bench on the ONNX bundle weighs onnxruntime's precisions per tier
    assert main(["bench", str(dist), "--profiles", "pixel8,laptop-x86", "--tokens", "2"]) == 0
    report = json.loads((dist / "bench" / "bench.json").read_text())
    pixel8_tier = report["tiers"][0]["decision"]
    assert pixel8_tier["runtime"] == "onnxruntime" and pixel8_tier["chosen_precision"] == "int4"
    assert {c["precision"] for c in pixel8_tier["candidates"]} == {"fp32", "int8", "int4"}
