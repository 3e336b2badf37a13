"""`flexrank-export --profile … --budget auto`, `flexrank bench` and `flexrank profiles` end
to end on a tiny Llama: the decision, the bundle with measured and predicted figures, the
runtime on the result, and clear errors for bad input."""

from __future__ import annotations

import json
import logging

import yaml
from conftest import char_tokenizer, tiny_llama

from flexrank.cli import export_main, main
from flexrank.compress.pipeline import STATE_FILE
from flexrank.device_profiles import PROFILE_DIR
from flexrank.manifest import load_manifest
from flexrank.runtime.session import ElasticSession

logging.getLogger("optimum").setLevel(logging.ERROR)


def impossible_profile(tmp_path, decode=1e7):
    raw = yaml.safe_load((PROFILE_DIR / "pixel8.yaml").read_text())
    raw["name"] = "impossible"
    raw["targets"]["decode_tokens_per_s"] = decode
    path = tmp_path / "impossible.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_export_auto_then_session_then_bench(checkpoint, tmp_path, capsys):
    dist = tmp_path / "dist"
    # pixel8 runs ExecuTorch; --format onnx ships onnxruntime, predicted as such
    assert export_main([str(checkpoint), "--profile", "pixel8", "--budget", "auto",
                        "--format", "onnx", "--layout", "elastic", "-o", str(dist)]) == 0
    out = capsys.readouterr().out
    assert "--format onnx ships onnxruntime, so the prediction uses onnxruntime/cpu" in out
    for stage in ("[1/5] elastic checkpoint", "[2/5] budget decision", "[3/5] export",
                  "[4/5] host measurement", "[5/5] manifest"):
        assert stage in out
    assert "Chosen: β 1 fp32." in out and "decode" in out  # every budget in the table
    manifest = load_manifest(dist)  # the rewritten manifest still verifies
    assert manifest["deployment"]["chosen_beta"] == 1.0
    assert manifest["profiles"]["pixel8"]["label"] == "predicted"
    assert manifest["profiles"]["pixel8"]["runtime"] == "onnxruntime"
    assert [b["beta"] for b in manifest["profiles"]["pixel8"]["budgets"]] == [1.0, 0.8, 0.6]
    assert manifest["predicted_device_latency"]["label"].startswith("predicted")
    host = manifest["host_latency"]
    assert host["label"].startswith("measured on host") and host["decode_ms_median"] > 0
    assert host["prompt_tokens"] == 64 and host["threads"] <= 4
    assert len(manifest["budget_costs"]) == 3

    session = ElasticSession(dist)
    assert session.beta == 1.0  # the profile's choice is the default
    first = session.generate("to be", max_new_tokens=5, stop_at_eos=False)
    session.set_budget(0.6)
    low = session.generate("to be", max_new_tokens=5, stop_at_eos=False)
    assert len(first.token_ids) == len(low.token_ids) == 5 and session.loaded_graphs == 1

    assert main(["bench", str(dist), "--profiles", "pixel8,laptop-x86", "--tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "pixel8" in out and "laptop-x86" in out and "predicted" in out
    report = json.loads((dist / "bench" / "bench.json").read_text())
    assert [t["profile"] for t in report["tiers"]] == ["pixel8", "laptop-x86"]
    measured = [r for t in report["tiers"] for r in t["rows"] if r["measured"]]
    assert len(measured) == 6 and all(r["measured"]["decode_ms_median"] > 0 for r in measured)
    assert (dist / "bench" / "bench.png").read_bytes()[:4] == b"\x89PNG"
    load_manifest(dist)  # bench writes beside the bundle, never into it


def test_no_budget_fits_says_which_target_and_by_how_much(checkpoint, tmp_path, capsys):
    dist = tmp_path / "dist"
    code = export_main([str(checkpoint), "--profile", str(impossible_profile(tmp_path)),
                        "-o", str(dist)])
    err = capsys.readouterr().err
    assert code == 1 and "No candidate meets every target on impossible" in err
    assert "decode" in err and "target 1e+07 tok/s" in err and "%" in err
    assert not dist.exists()


def test_dry_run_and_fixed_budget(checkpoint, tmp_path, capsys):
    dist = tmp_path / "dist"
    assert export_main([str(checkpoint), "--profile", "pixel8", "--dry-run",
                        "-o", str(dist)]) == 0
    assert "dry run: nothing written" in capsys.readouterr().out and not dist.exists()
    assert export_main([str(checkpoint), "--budget", "0.8", "-o", str(dist)]) == 0
    manifest = load_manifest(dist)
    assert [b["beta"] for b in manifest["budgets"]] == [0.8]
    assert manifest["deployment"]["chosen_beta"] == 0.8 and "profiles" in manifest
    forced = tmp_path / "forced"
    assert export_main([str(checkpoint), "--profile", str(impossible_profile(tmp_path)),
                        "--format", "onnx", "--budget", "1", "-o", str(forced)]) == 0
    assert "note: β 1 fp32 does not meet impossible's targets" in capsys.readouterr().out
    assert load_manifest(forced)["profiles"]["impossible"]["chosen_beta"] is None


def test_bad_input_is_refused_clearly(checkpoint, tmp_path, capsys):
    args = [str(checkpoint), "-o", str(tmp_path / "d")]
    assert export_main([*args, "--profile", "pixel9"]) == 2
    err = capsys.readouterr().err
    assert "unknown device profile 'pixel9'" in err and "pixel8" in err and "server-x86" in err
    assert export_main([*args, "--profile", "pixel8", "--budget", "0.5"]) == 2
    assert "0.5 is not one of the plan's budgets [0.6, 0.8, 1.0]" in capsys.readouterr().err
    assert export_main([*args, "--budget", "auto"]) == 2
    assert "--budget auto needs --profile" in capsys.readouterr().err
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert export_main([str(checkpoint), "--profile", "pixel8", "-o", str(full)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "nothing")]) == 2
    assert "not a finished FlexRank bundle" in capsys.readouterr().err


def test_profiles_command_lists_every_profile(capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    for name in ("pixel8", "laptop-x86", "server-x86", "iphone15"):
        assert name in out


def test_plain_model_is_compressed_once_then_reused(tmp_path, capsys, caplog):
    """... and the fast defaults' few-calibration-tokens warnings (their choice, not the
    user's) are DEBUG lines, one note saying so instead."""
    import logging

    from flexrank.cli.export import FEW_TOKEN_LOGGERS

    caplog.set_level(logging.DEBUG)
    model = tiny_llama(init_std=0.2)
    model.save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    work = tmp_path / "work"
    common = [str(tmp_path / "model"), "--profile", "pixel8", "--work-dir", str(work),
              "--budgets", "1,0.7", "--steps", "2", "--dry-run"]
    assert export_main(common) == 0
    out = capsys.readouterr().out
    assert "compressing" in out and "the fast defaults calibrate on few tokens" in out
    def few_token_records():
        return [r for r in caplog.records if r.name in FEW_TOKEN_LOGGERS]

    assert not [r for r in few_token_records() if r.levelno >= logging.WARNING]
    caplog.clear()  # with -v they are there, as DEBUG lines
    assert export_main([*common[:4], str(tmp_path / "work-v"), *common[5:], "-v"]) == 0
    shown = few_token_records()
    assert any("are recommended" in r.getMessage() for r in shown), shown
    assert all(r.levelno == logging.DEBUG for r in shown)
    capsys.readouterr()
    state = json.loads((work / STATE_FILE).read_text())
    assert export_main(common) == 0
    again = json.loads((work / STATE_FILE).read_text())["done"]
    for stage in ("calibration", "covariance", "decompose", "probe", "plan"):
        assert again[stage] == state["done"][stage]  # cached, not recomputed
