"""Messages that name the file or option (issue 21 §5, the eval part and every numeric
option): `flexrank eval` on non-UTF-8 text or a bundle without tokenizer files names the
file and what to do; every numeric option of every command is checked up front with its
name, value and allowed range, before anything is loaded."""

from __future__ import annotations

import pytest
from conftest import char_tokenizer
from elastic_fixtures import tiny_elastic

import flexrank
import flexrank.cli.bench as cli_bench
import flexrank.cli.export as cli_export
from flexrank.cli import export_main, main
from flexrank.compress.elastic import ElasticModel
from flexrank.exporters import export
from flexrank.exporters.onnx.convert import OnnxExportConfig


@pytest.fixture(scope="module")
def student_and_plan():
    student, _, plan, _, _ = tiny_elastic(seed=5)
    return student, plan


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("".join(f"{i} the quick brown fox\n" for i in range(20)))
    return path


def test_eval_names_a_text_file_that_is_not_utf8(student_and_plan, tmp_path, capsys):
    student, plan = student_and_plan
    ElasticModel(student, plan, char_tokenizer(), model_id="tiny").save_pretrained(
        tmp_path / "elastic")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    assert main(["eval", str(tmp_path / "elastic"), "--text", str(latin1), "--no-teacher"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: --text {latin1} is not UTF-8 text (byte 0xe9 at offset 3): "
                           f"pass a UTF-8 file, e.g. converted with `iconv -f latin1 -t utf-8 "
                           f"{latin1}`")


def test_eval_of_a_bundle_without_tokenizer_files(student_and_plan, tmp_path, text, capsys):
    student, plan = student_and_plan
    dist = tmp_path / "dist"
    export(ElasticModel(student, plan, model_id="tiny"), dist, budgets=[0.6],
           config=OnnxExportConfig(validate=False))
    assert main(["eval", str(dist), "--text", str(text), "--no-teacher"]) == 2
    err = capsys.readouterr().err
    folder = dist / "budget-0.6"
    assert folder.is_dir()
    assert f"error: bundle {dist} has no tokenizer files in {folder} (expected one of " \
           "tokenizer.json" in err
    assert "copy the original model's tokenizer files" in err
    assert "model_file or model_proto" not in err


def test_eval_of_an_elastic_checkpoint_without_tokenizer(student_and_plan, tmp_path, text,
                                                         capsys):
    student, plan = student_and_plan
    ElasticModel(student, plan, model_id="tiny").save_pretrained(tmp_path / "elastic")
    assert main(["eval", str(tmp_path / "elastic"), "--text", str(text), "--no-teacher"]) == 2
    err = capsys.readouterr().err
    assert f"error: elastic checkpoint {tmp_path / 'elastic'} has no tokenizer" in err
    assert "copy the original model's tokenizer files into it" in err


# (command line, the message argparse must give): the option, the value and the range.
BAD_OPTIONS = [
    (["eval", "e", "--text", "t", "--seq-len", "1"], "argument --seq-len: 1 is out of range: "
                                                     "must be >= 2"),
    (["eval", "e", "--text", "t", "--seq-len", "abc"], "argument --seq-len: 'abc' is not a "
                                                       "whole number"),
    (["eval", "e", "--text", "t", "--stride", "0"], "argument --stride: 0 is out of range: "
                                                    "must be >= 1"),
    (["eval", "e", "--text", "t", "--max-tokens", "-5"], "argument --max-tokens: -5 is out of "
                                                         "range: must be >= 2"),
    (["eval", "e", "--text", "t", "--max-tokens", "1e3"], "argument --max-tokens: '1e3' is not "
                                                          "a whole number"),
    (["bench", "d", "--tokens", "0"], "argument --tokens: 0 is out of range: must be >= 1"),
    (["bench", "d", "--tokens", "many"], "argument --tokens: 'many' is not a whole number"),
    (["decompose", "m", "--samples", "0"], "argument --samples: 0 is out of range: must be >= 1"),
    (["decompose", "m", "--seq-len", "1"], "argument --seq-len: 1 is out of range: must be >= 2"),
    (["decompose", "m", "--batch-size", "0"], "argument --batch-size: 0 is out of range: must "
                                              "be >= 1"),
    (["decompose", "m", "--seed", "-1"], "argument --seed: -1 is out of range: must be >= 0"),
    (["export", "m", "--steps", "-1"], "argument --steps: -1 is out of range: must be >= 0"),
    (["export", "m", "--budgets", "1,abc"], "argument --budgets: 'abc' in '1,abc' is not a "
                                            "number"),
    (["compress", "m", "-o", "o", "--budget-weights", "0.6=0.5"],
     "argument --budget-weights: '0.6=0.5' in '0.6=0.5' is not a budget:weight pair with a "
     "weight >= 0: give pairs like 0.6:0.5,0.8:0.45,0.4:0.05"),
    (["compress", "m", "-o", "o", "--budget-weights", "0.6:0.5,0.8:-1"],
     "argument --budget-weights: '0.8:-1' in '0.6:0.5,0.8:-1' is not a budget:weight pair"),
    (["compress", "m", "-o", "o", "--budget-weights", "0.6:0.5,0.6:0.4"],
     "argument --budget-weights: '0.6:0.5,0.6:0.4' weighs budget(s) [0.6] more than once: "
     "give each budget one weight"),
    (["compress", "m", "-o", "o", "--intermediate-weight", "-1"],
     "argument --intermediate-weight: -1.0 is out of range: must be >= 0"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_OPTIONS,
                         ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_OPTIONS])
def test_numeric_options_are_checked_with_name_value_and_range(argv, message, monkeypatch,
                                                               capsys):
    monkeypatch.setattr(flexrank, "load_model", not_called)
    monkeypatch.setattr(cli_bench, "bench", not_called)
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["eval", "e", "--text", "t", "--seq-len", "16", "--stride", "32"],
     "--stride 32 is more than --seq-len 16: windows would skip tokens"),
    (["export", "m", "--budget", "1.5"], "--budget 1.5 is out of range (0, 1]"),
    (["export", "m", "--budget", "half"], "--budget 'half': give auto, all or a number"),
])
def test_options_checked_together_before_any_work(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(cli_export, "load_or_compress", not_called)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1


def test_compress_budget_weights_by_budget_and_checked_before_any_work(monkeypatch, capsys):
    """--budget-weights pairs become DistillConfig.budget_weights in ascending budget order
    (left-out budgets 0), with the other encoder-recipe options; a β that --budgets lacks is
    refused before the model is loaded."""
    import flexrank.compress.pipeline as pipeline
    from flexrank.cli import build_parser
    from flexrank.cli.compress import compress_config

    args = build_parser().parse_args([
        "compress", "m", "-o", "o", "--budgets", "1,0.5,0.8,0.6", "--sampler", "weighted",
        "--budget-weights", "0.8:0.45,0.6:0.5,0.5:0.05", "--intermediate-weight", "1",
        "--balance-factors"])
    distill = compress_config(args).distill
    assert distill.budget_weights == (0.05, 0.5, 0.45, 0.0)  # β 0.5, 0.6, 0.8, 1
    assert (distill.sampler, distill.intermediate_weight, distill.balance_factors) == \
        ("weighted", 1.0, True)
    assert compress_config(build_parser().parse_args(
        ["compress", "m", "-o", "o"])).distill.balance_factors is False
    monkeypatch.setattr(pipeline, "compress", not_called)
    assert main(["compress", "m", "-o", "o", "--budget-weights", "0.5:1,0.6:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --budget-weights names budget(s) [0.5] that --budgets "
                          "1,0.8,0.6,0.4 does not have: add them to --budgets"), err
    for argv, message in (
            (["--sampler", "weighted"], "--sampler weighted draws one budget a step by "
                                        "--budget-weights: give them"),
            (["--sampler", "uniform", "--budget-weights", "0.6:1"],
             "--budget-weights is read by --sampler weighted and sandwich, not uniform"),
            (["--budget-weights", "0.6:0,0.8:0"], "--budget-weights {0.6: 0.0, 0.8: 0.0} "
                                                  "gives every budget weight 0")):
        assert main(["compress", "m", "-o", "o", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {message}"), err
    assert main(["compress", "m", "-o", "o", "--sampler", "weighted", "--budget-weights",
                 "1:1,0.6:0", "--full-budget", "refit"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: distill.budget_weights [0.0, 0.0, 0.0, 1.0] weigh only the "
                          "full budget, which full_budget 'refit' does not train"), err


def not_called(*args, **kwargs):
    raise AssertionError("an option was checked only after work started")


def test_export_main_names_the_option(capsys):
    with pytest.raises(SystemExit):
        export_main(["m", "--steps", "x"])
    assert "argument --steps: 'x' is not a whole number" in capsys.readouterr().err


def test_library_import_warnings_stay_out_of_the_default_output():
    """torchao (imported by transformers and the exporters) warns about its CUDA kernels
    and triton at import; the CLI shows that only with -v."""
    import subprocess
    import sys

    code = ("import sys; from flexrank.cli import _setup_logging; "
            "_setup_logging(sys.argv[1] == 'verbose'); import torchao")
    quiet = subprocess.run([sys.executable, "-c", code, "quiet"], capture_output=True,
                           text=True, timeout=300)
    loud = subprocess.run([sys.executable, "-c", code, "verbose"], capture_output=True,
                          text=True, timeout=300)
    assert quiet.returncode == loud.returncode == 0
    if "torchao" not in loud.stderr:  # a machine with triton and torchao's CUDA kernels
        pytest.skip("torchao imports silently here: nothing to keep out")
    assert "torchao" not in quiet.stderr and "_pytree" not in quiet.stderr


def test_a_missing_model_path_is_named_before_any_cache_folder(tmp_path, monkeypatch, capsys):
    """A typo used to print 'compressing ... into <cache>' and leave that folder behind."""
    monkeypatch.setenv("FLEXRANK_CACHE", str(tmp_path / "cache"))
    assert export_main([str(tmp_path / "nope"), "--profile", "pixel8", "-o",
                        str(tmp_path / "dist")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nope'} does not exist: give an elastic checkpoint folder" in err
    assert not (tmp_path / "cache" / "compress").exists()


def test_options_for_plain_models_are_noted_on_a_checkpoint(student_and_plan, tmp_path,
                                                            capsys):
    student, plan = student_and_plan
    checkpoint = tmp_path / "ckpt"
    ElasticModel(student, plan, char_tokenizer(), model_id="tiny").save_pretrained(checkpoint)
    assert export_main([str(checkpoint), "--profile", "pixel8", "--dry-run"]) == 0
    assert "note:" not in capsys.readouterr().out
    assert export_main([str(checkpoint), "--profile", "pixel8", "--dry-run", "--budgets",
                        "0.5,1", "--steps", "3"]) == 0
    assert ("note: --budgets and --steps apply when compressing a plain model"
            in capsys.readouterr().out)


def test_the_cli_says_where_executorch_quantization_is(tmp_path, capsys):
    assert export_main([str(tmp_path), "--format", "executorch", "--quantize", "int4",
                        "--profile", "pixel8", "-o", str(tmp_path / "dist")]) == 2
    assert "--quantize none, 8da4w" in capsys.readouterr().err


def test_a_checkpoint_without_tokenizer_does_not_look_for_one(student_and_plan, tmp_path,
                                                              monkeypatch):
    """Looking for a tokenizer that was never saved made transformers build a default one
    for the model type and print its notices (a new user saw LlamaTokenizer's 'legacy
    behaviour' text); with no tokenizer file, none is looked for."""
    import transformers

    student, plan = student_and_plan
    ElasticModel(student, plan, None, model_id="tiny").save_pretrained(tmp_path / "plain")
    ElasticModel(student, plan, char_tokenizer(), model_id="tiny").save_pretrained(
        tmp_path / "with")
    calls = []
    real = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    assert ElasticModel.from_pretrained(tmp_path / "plain").tokenizer is None and calls == []
    assert ElasticModel.from_pretrained(tmp_path / "with").tokenizer is not None
    assert len(calls) == 1
