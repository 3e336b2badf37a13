"""`flexrank compress` after a fault: a run that failed or was killed early leaves a folder
the next run can use, settings are checked before any work, and a damaged elastic
checkpoint names its file and says what to do (issue 21 §3, §5)."""

import json
import re
import shutil

import pytest
from conftest import char_tokenizer, tiny_llama
from elastic_fixtures import tiny_elastic

import flexrank.compress.pipeline as pipeline
from flexrank.cli import main
from flexrank.compress.config import CompressConfig, DistillConfig, ProbeConfig
from flexrank.compress.elastic import META_FILE, PLAN_FILE, ElasticModel
from flexrank.compress.models import ModelLoadError, load_model
from flexrank.compress.pipeline import FIRST_READER, STATE_FILE, CompressError, compress
from flexrank.planning.planner import NestedPlan


@pytest.fixture
def model_dir(tmp_path):
    tiny_llama(init_std=0.2).save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("".join(f"{i} the quick brown fox jumps over the lazy dog\n"
                            for i in range(400)))
    return tmp_path / "model", text


def config(text, steps=2, budgets=(1.0, 0.7), **changes):
    return CompressConfig(calib=str(text), num_samples=16, seq_len=32, eval_samples=4,
                          batch_size=4, budgets=budgets,
                          probe=ProbeConfig(mode="fast", num_levels=4, probe_points=2),
                          probe_samples=2, distill=DistillConfig(steps=steps, batch_size=4),
                          **changes)


def finished(out):
    return json.loads((out / STATE_FILE).read_text())["done"]


def test_a_run_that_failed_before_any_stage_is_continued(model_dir, tmp_path):
    model, text = model_dir
    out = tmp_path / "out"
    with pytest.raises(ModelLoadError):  # a typo in the model path
        compress(tmp_path / "no-such-model", out, config(text))
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ValueError, match="need"):  # too little calibration text
        compress(model, out, config(short))
    assert finished(out) == {}
    elastic, _ = compress(model, out, config(text))  # the corrected run uses the folder
    assert list(finished(out)) == [s for s in pipeline.STAGES if s != "depth"]  # no --depth
    assert elastic.budgets == [0.7, 1.0]


def test_a_run_killed_in_its_first_seconds_resumes(model_dir, tmp_path, monkeypatch):
    model, text = model_dir
    out = tmp_path / "out"

    def killed(spec, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "load_model", killed)
    with pytest.raises(KeyboardInterrupt):
        compress(model, out, config(text))
    monkeypatch.undo()
    compress(model, out, config(text))
    assert list(finished(out)) == [s for s in pipeline.STAGES if s != "depth"]  # no --depth


def test_resume_does_not_depend_on_the_order_of_the_budgets(model_dir, tmp_path):
    model, text = model_dir
    out = tmp_path / "out"
    compress(model, out, config(text, budgets=(1.0, 0.6, 0.8)))
    before = {stage: v["seconds"] for stage, v in finished(out).items()}
    elastic, _ = compress(model, out, config(text, steps=4, budgets=(0.8, 1.0, 0.6)))
    for stage in ("calibration", "covariance", "decompose", "probe", "plan"):
        assert finished(out)[stage]["seconds"] == before[stage]  # not recomputed
    assert elastic.budgets == [0.6, 0.8, 1.0]
    assert json.loads((out / "stages" / "checkpoint" / "state.json").read_text())["step"] == 4


def test_duplicate_budgets_are_refused_before_any_work(model_dir, tmp_path, capsys):
    model, text = model_dir
    with pytest.raises(ValueError, match=r"budget 0.7 is given twice in \[1.0, 0.7, 0.7\]"):
        config(text, budgets=(1.0, 0.7, 0.7))
    with pytest.raises(ValueError, match=r"budget 0\.70+\d+ is given twice"):
        config(text, budgets=(0.7, 1.0, 0.7 + 1e-12))  # the same budget, as floats go
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["compress", str(model), "-o", str(out), "--calib", str(text),
              "--budgets", "1,0.7,0.7"])
    assert exit_.value.code == 2
    assert "argument --budgets: budget 0.7 is given twice" in capsys.readouterr().err
    assert not out.exists()


def test_budgets_may_change_while_no_stage_that_reads_them_finished(model_dir, tmp_path,
                                                                    monkeypatch):
    """A run that stopped after probing (as one whose duplicate budget was caught at the plan
    did) is continued with corrected budgets: the probe is reused, the plan is new."""
    model, text = model_dir
    out = tmp_path / "out"

    def planner_fails(*args, **kwargs):
        raise ValueError("the plan failed")

    monkeypatch.setattr(pipeline, "make_plan", planner_fails)
    with pytest.raises(ValueError, match="the plan failed"):
        compress(model, out, config(text, budgets=(1.0, 0.7)))
    monkeypatch.undo()
    probed = finished(out)["probe"]["seconds"]
    assert "plan" not in finished(out)
    elastic, _ = compress(model, out, config(text, budgets=(1.0, 0.6)))
    assert finished(out)["probe"]["seconds"] == probed
    assert list(NestedPlan.load(out / "stages" / "plan.json").budgets) == [0.6, 1.0]
    assert elastic.budgets == [0.6, 1.0]
    # once the plan is finished, other budgets would contradict it: refused, naming it
    with pytest.raises(CompressError, match=r"differs in: budgets\) that its finished "
                                            r"stages \(plan, distill, save\)"):
        compress(model, out, config(text, budgets=(1.0, 0.5)))


def test_every_setting_has_a_first_reading_stage():
    assert set(CompressConfig().signature("m")) == set(FIRST_READER)
    assert set(FIRST_READER.values()) <= set(pipeline.STAGES)


def test_a_damaged_state_file_is_named(model_dir, tmp_path):
    model, text = model_dir
    out = tmp_path / "out"
    out.mkdir()
    (out / STATE_FILE).write_text('{"signature": {"model": "x')
    with pytest.raises(CompressError, match=f"{STATE_FILE} is damaged .*delete "
                                            + re.escape(str(out))):
        compress(model, out, config(text))


@pytest.mark.parametrize("option, value, allowed", [
    ("--samples", "0", ">= 1"), ("--seq-len", "1", ">= 2"), ("--batch-size", "0", ">= 1"),
    ("--seed", "-1", ">= 0"), ("--eval-samples", "-1", ">= 0"), ("--levels", "1", ">= 2"),
    ("--rank-multiple", "0", ">= 1"), ("--probe-samples", "0", ">= 1"),
    ("--steps", "-1", ">= 0"), ("--train-batch", "0", ">= 1"), ("--grad-accum", "0", ">= 1"),
    ("--lr", "0", "> 0"), ("--lr", "nan", "> 0")])
def test_cli_numeric_options_are_checked_before_any_work(tmp_path, capsys, option, value,
                                                         allowed):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["compress", "no-such-model", "-o", str(out), option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: " in err and f"must be {allowed}" in err, err
    assert not out.exists()


def test_cli_names_the_option_of_a_bad_list_or_a_cross_check(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compress", "m", "-o", str(tmp_path / "o"), "--budgets", "1,abc"])
    assert "argument --budgets: 'abc' in '1,abc' is not a number" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # flexrank-export's budgets of a plain model
        main(["export", "m", "--work-dir", str(tmp_path / "w"), "--budgets", "1,abc"])
    assert "argument --budgets: 'abc' in '1,abc' is not a number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "m", "--work-dir", str(tmp_path / "w"), "--budgets", "1.5,1"])
    assert "argument --budgets: budget 1.5 is out of range (0, 1]" in capsys.readouterr().err
    rc = main(["compress", "m", "-o", str(tmp_path / "o"), "--samples", "4",
               "--probe-samples", "5"])
    assert rc == 2
    assert "--probe-samples 5 is more than --samples 4" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An elastic checkpoint folder of a tiny Llama."""
    student, _, plan, train, _ = tiny_elastic(seed=7)
    folder = tmp_path_factory.mktemp("ckpt") / "elastic"
    ElasticModel(student, plan).save_pretrained(folder)
    return folder


def copy_of(folder, tmp_path):
    target = tmp_path / "elastic"
    shutil.copytree(folder, target)
    ElasticModel.from_pretrained(target)  # intact before the damage
    return target


def test_damaged_elastic_metadata_names_the_file(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path)
    meta = folder / META_FILE
    meta.write_text(meta.read_text()[:-20])  # cut short, as by a full disk
    with pytest.raises(ValueError, match=re.escape(f"{meta} is damaged, not valid JSON (")
                       + ".*flexrank compress"):
        ElasticModel.from_pretrained(folder)


def test_hand_edited_plan_names_the_file(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path)
    plan = json.loads((folder / PLAN_FILE).read_text())
    plan["ranks"][0], plan["ranks"][-1] = plan["ranks"][-1], plan["ranks"][0]  # not nested
    (folder / PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=re.escape(f"{folder / PLAN_FILE} is damaged or was "
                                                   "edited by hand (")
                       + ".*non-decreasing.*restore"):
        ElasticModel.from_pretrained(folder)
    plan["ranks"][0], plan["ranks"][-1] = plan["ranks"][-1], plan["ranks"][0]
    plan["ranks"][-1][0] += 1000  # nested, but above the layer's max rank
    (folder / PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=re.escape(str(folder / PLAN_FILE))):
        ElasticModel.from_pretrained(folder)


def test_missing_elastic_metadata_is_not_taken_for_a_plain_model(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path)
    (folder / META_FILE).unlink()
    expected = re.escape(f"{folder / META_FILE} is missing: {folder} holds a FlexRank elastic "
                         "checkpoint")
    with pytest.raises(ModelLoadError, match=expected) as error:
        load_model(folder)
    assert "no weights" not in str(error.value)
    with pytest.raises(ModelLoadError, match=expected):  # a compress folder holding it
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match=expected):
        ElasticModel.from_pretrained(folder)


def _state_folder(tmp_path, done: list[str], checkpoint: bool):
    """An output folder as a run with signature {model, budgets, distill} left it."""
    out = tmp_path / "run"
    (out / "stages").mkdir(parents=True)
    signature = {"model": "tiny", "budgets": [0.5, 1.0], "distill": {"lr": 1e-4}}
    (out / STATE_FILE).write_text(json.dumps(
        {"signature": signature, "done": {stage: {"seconds": 1.0} for stage in done}}))
    if checkpoint:
        (out / "stages" / "checkpoint").mkdir()
        (out / "stages" / "checkpoint" / "state.pt").write_text("trained")
    return out, signature


BEFORE_DISTILL = ["calibration", "covariance", "decompose", "probe", "plan"]


def test_a_changed_distill_setting_never_deletes_a_distillation_under_way(tmp_path):
    out, signature = _state_folder(tmp_path, BEFORE_DISTILL, checkpoint=True)
    with pytest.raises(CompressError, match="distillation has begun"):
        pipeline._check_output(out, {**signature, "distill": {"lr": 3e-4}})
    assert (out / "stages" / "checkpoint" / "state.pt").read_text() == "trained"


def test_a_changed_model_or_text_never_discards_finished_factors(tmp_path):
    out, signature = _state_folder(tmp_path, BEFORE_DISTILL, checkpoint=False)
    with pytest.raises(CompressError, match=r"differs in: model.*calibration, covariance"):
        pipeline._check_output(out, {**signature, "model": "other"})


def test_changed_budgets_before_distillation_re_plan(tmp_path):
    out, signature = _state_folder(tmp_path, BEFORE_DISTILL, checkpoint=False)
    state = pipeline._check_output(out, {**signature, "budgets": [0.4, 1.0]})
    assert sorted(state["done"]) == ["calibration", "covariance", "decompose", "probe"]


def test_a_folder_from_before_top_k_and_fisher_draws_resumes_untouched(tmp_path):
    """Probe settings added later (top_k, fisher_draws) at values that change nothing do
    not count as changed settings: a finished, distilled folder written before they
    existed resumes with nothing run again; a real change is still refused."""
    out, signature = _state_folder(tmp_path, [*BEFORE_DISTILL, "distill", "save"],
                                   checkpoint=False)
    old_probe = {"mode": "fast", "num_levels": 8, "rank_multiple": 8, "probe_points": 2,
                 "version": 1}
    state = json.loads((out / STATE_FILE).read_text())
    state["signature"]["probe"] = old_probe
    (out / STATE_FILE).write_text(json.dumps(state))
    now = {**signature, "probe": {**old_probe, "top_k": 0, "fisher_draws": 8}}
    assert sorted(pipeline._check_output(out, now)["done"]) == sorted(
        [*BEFORE_DISTILL, "distill", "save"])
    with pytest.raises(CompressError, match=r"differs in: probe.*resumes with "
                       r"--probe-points 3 --probe-top-k 0 --probe-samples 4"):
        pipeline._check_output(out, {**signature, "probe": {**old_probe, "top_k": 64}})
    with pytest.raises(CompressError, match=r"differs in: probe"):
        pipeline._check_output(out, {**signature, "probe": {**old_probe, "mode": "fisher",
                                                           "fisher_draws": 8}})
