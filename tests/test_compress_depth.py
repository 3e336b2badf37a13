"""`flexrank compress --depth` (issue 18) end to end on a tiny 4-block Llama built in code:
the checkpoint's plan is a JointPlan and, at a budget that replaces a block, its logits
equal a plain transformers Llama whose weights are written by hand from the saved tensors
(U_r V_rᵀ per kept layer, s ⊙ (W_donor + U_a V_aᵀ) per stand-in linear, the stand-in's
own norms); the depth stage resumes without measuring again (calls counted); a changed
--max-replaced re-runs depth and plan only; bad values and an unreachable budget are
clear errors before any training."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import char_tokenizer

import flexrank.compress.depth as depth_module
import flexrank.compress.pipeline as pipeline
from flexrank.cli import build_parser, main
from flexrank.cli.compress import compress_config
from flexrank.compress.config import CompressConfig, DepthConfig
from flexrank.compress.elastic import PLAN_FILE, WEIGHTS_FILE, ElasticModel
from flexrank.compress.pipeline import STATE_FILE, CompressError, compress
from flexrank.planning.depth import BlockSensitivity, JointPlan

NUM_BLOCKS = 4


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=NUM_BLOCKS, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                       pad_token_id=2, initializer_range=0.2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("depth-compress")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).eval().save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    text = root / "text.txt"
    text.write_text("".join(f"{i} the quick brown fox jumps over the lazy dog\n"
                            for i in range(400)))
    return root / "model", text


def argv(model_dir, out, *extra, budgets="1,0.6,0.3"):
    model, text = model_dir
    return ["compress", str(model), "-o", str(out), "--calib", str(text), "--samples", "16",
            "--seq-len", "32", "--eval-samples", "4", "--batch-size", "4", "--budgets",
            budgets, "--levels", "4", "--probe-points", "2", "--probe-samples", "2",
            "--steps", "2", "--train-batch", "4", "--depth", "--adapter-ranks", "2,4,8",
            *extra]


def config_of(args: list[str]) -> CompressConfig:
    """The CompressConfig the command line builds for `args` (the same resume signature)."""
    return compress_config(build_parser().parse_args(args))


def finished(out) -> dict:
    return json.loads((out / STATE_FILE).read_text())["done"]


def counted(monkeypatch, module, name: str) -> list:
    """Replace module.name by a wrapper that records each call; returns the record."""
    calls, original = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def killed_before_the_plan(model_dir, out, monkeypatch, *extra):
    """A --depth run killed right after its depth stage (in the joint planner)."""
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "joint_plan", killed)
        with pytest.raises(KeyboardInterrupt):
            compress(model_dir[0], out, config_of(argv(model_dir, out, *extra)))
    done = finished(out)
    assert "depth" in done and "plan" not in done
    return done


# ------------------------------------------------------------------ the checkpoint


def dense_reference(model_dir, folder, plan: JointPlan, beta: float, replace: bool = True):
    """A plain transformers Llama (float64) with the weights the elastic model computes at
    `beta`, written from the saved safetensors file (read by safetensors itself): a kept
    layer U_r V_rᵀ at its planned rank; a stand-in's linear s ⊙ (W_donor + U_a V_aᵀ)
    with the donor at its own planned rank, and the stand-in's own norms. replace=False:
    the replaced blocks' own layers instead (a reference the test must not match)."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    tensors = {k: v.double() for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
    ranks = plan.ranks_for(beta)
    replaced = plan.replaced_for(beta) if replace else {}

    def dense(layer: str) -> torch.Tensor:
        r = ranks[layer]
        return tensors[f"{layer}.U"][:, :r] @ tensors[f"{layer}.V"][:, :r].T

    reference = LlamaForCausalLM(tiny_llama_config()).double().eval()
    state = {}
    for name in reference.state_dict():
        block = ".".join(name.split(".")[:3])  # "model.layers.3"
        layer = name.removesuffix(".weight")
        if block in replaced:
            rel = name[len(block) + 1:].removesuffix(".weight")
            stand_in = f"{block}.depth_stand_in.{rel}"
            if layer in ranks:
                donor, a = replaced[block]
                U, V = tensors[f"{stand_in}.U"], tensors[f"{stand_in}.V"]
                a = min(a, U.shape[1])
                adapter = U[:, :a] @ V[:, :a].T
                state[name] = tensors[f"{stand_in}.scale"][:, None] * (
                    dense(f"{donor}.{rel}") + adapter)
            else:  # the stand-in's own norms
                state[name] = tensors[f"{block}.depth_stand_in.{rel}.weight"]
        elif layer in ranks:
            state[name] = dense(layer)
        elif name in tensors:
            state[name] = tensors[name]
    if "model.embed_tokens.weight" not in state:  # tied: saved once, under the head's name
        state["model.embed_tokens.weight"] = tensors["lm_head.weight"]
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    return reference


def test_cli_depth_checkpoint_holds_a_joint_plan_equal_to_a_hand_built_llama(
        model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    args = argv(model_dir, out)
    assert main(args) == 0
    printed = capsys.readouterr().out
    folder = out / "elastic"
    assert json.loads((folder / PLAN_FILE).read_text())["format"] == "flexrank-joint-plan"
    loaded = ElasticModel.from_pretrained(out)
    plan = loaded.plan
    assert isinstance(plan, JointPlan) and plan.budgets == (0.3, 0.6, 1.0)
    assert plan.replaced_for(1.0) == {}
    assert plan.replaced_for(0.3), "no block replaced at 0.3: nothing would be tested"
    assert list(finished(out)) == list(pipeline.STAGES)

    ids = torch.tensor([char_tokenizer()(f"{i} the lazy dog jumps over the quick fox")
                        ["input_ids"] for i in (13, 17)])
    with torch.no_grad():
        for beta in plan.budgets:
            got = loaded.set_budget(beta).model(ids, use_cache=False).logits.double()
            want = dense_reference(model_dir, folder, plan, beta)(ids, use_cache=False).logits
            assert (got - want).abs().max() < 1e-4, (beta, float((got - want).abs().max()))
        # the stand-in matters: the replaced blocks' own layers give other logits
        kept = dense_reference(model_dir, folder, plan, 0.3, replace=False)
        got = loaded.set_budget(0.3).model(ids, use_cache=False).logits.double()
        assert (got - kept(ids, use_cache=False).logits).abs().max() > 1e-2

    # the summary names the replaced blocks per budget (block<donor@adapter rank), as the
    # saved plan's tables give them
    table = json.loads((folder / PLAN_FILE).read_text())
    summary = (out / "summary.txt").read_text()
    assert summary.strip() in printed
    for b, beta in enumerate(table["budgets"]):
        row = next(line for line in summary.splitlines()
                   if line.split() and line.split()[0] == f"{beta:g}")
        names = [f"{j}<{table['donors'][j]}@{a}"
                 for j, a in enumerate(table["adapter_ranks"][b]) if a]
        assert " ".join(names or ["-"]) in row, (beta, row)

    # the same command again resumes every stage: nothing measured again, and the model it
    # rebuilds in memory gives the saved checkpoint's logits, bit for bit
    measured = (counted(monkeypatch, pipeline, "probe_depth")
                + counted(monkeypatch, pipeline, "collect_covariances")
                + counted(monkeypatch, pipeline, "probe"))
    elastic, _ = compress(model_dir[0], out, config_of(args))
    assert measured == []
    with torch.no_grad():
        for beta in plan.budgets:
            assert torch.equal(elastic.set_budget(beta).model(ids, use_cache=False).logits,
                               loaded.set_budget(beta).model(ids, use_cache=False).logits)


# ------------------------------------------------------------------ resume


def test_killed_after_the_depth_stage_resumes_without_measuring_again(model_dir, tmp_path,
                                                                      monkeypatch):
    out = tmp_path / "out"
    done = killed_before_the_plan(model_dir, out, monkeypatch)
    measured = (counted(monkeypatch, pipeline, "probe_depth")
                + counted(monkeypatch, pipeline, "depth_candidates")
                + counted(monkeypatch, pipeline, "collect_covariances")
                + counted(monkeypatch, depth_module, "_mean_damage"))
    elastic, _ = compress(model_dir[0], out, config_of(argv(model_dir, out)))
    assert measured == []  # the depth probe and its covariances were read back
    after = finished(out)
    for stage in ("calibration", "decompose", "probe", "depth"):
        assert after[stage] == done[stage]
    assert isinstance(elastic.plan, JointPlan) and "save" in after


def test_killed_inside_the_depth_probe_measures_only_what_is_left(model_dir, tmp_path,
                                                                  monkeypatch):
    out = tmp_path / "out"
    calls = {"n": 0}
    original = depth_module.build_stand_in

    def dies_at_the_second_stand_in(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(depth_module, "build_stand_in", dies_at_the_second_stand_in)
        with pytest.raises(KeyboardInterrupt):
            compress(model_dir[0], out, config_of(argv(model_dir, out)))
    assert "depth" not in finished(out) and "probe" in finished(out)
    partial = json.loads((out / "stages" / "depth-probe-partial.json").read_text())["partial"]
    assert len(partial["errors"]) == 1  # one of the two candidates measured
    damage = counted(monkeypatch, depth_module, "_mean_damage")
    covariances = counted(monkeypatch, pipeline, "collect_covariances")
    compress(model_dir[0], out, config_of(argv(model_dir, out)))
    assert len(damage) == 3  # the other candidate at each of the 3 adapter ranks, no more
    assert covariances == []  # saved before the probe began
    sens = BlockSensitivity.load(out / "stages" / "block-sensitivity.json")
    assert len(sens.candidates) == 2 and sens.errors.shape == (2, 3)


def test_a_changed_max_replaced_runs_depth_and_plan_again(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    done = killed_before_the_plan(model_dir, out, monkeypatch)  # --max-replaced 0.5
    assert len(BlockSensitivity.load(out / "stages" / "block-sensitivity.json").candidates) == 2
    probes = counted(monkeypatch, pipeline, "probe_depth")
    rank_probes = counted(monkeypatch, pipeline, "probe")
    elastic, _ = compress(model_dir[0], out, config_of(  # one block fewer: 0.3 is out of reach
        argv(model_dir, out, "--max-replaced", "0.25", budgets="1,0.6,0.4")))
    assert len(probes) == 1 and rank_probes == []
    after = finished(out)
    for stage in ("calibration", "decompose", "probe"):
        assert after[stage] == done[stage]
    assert after["depth"] != done["depth"]
    sens = BlockSensitivity.load(out / "stages" / "block-sensitivity.json")
    assert len(sens.candidates) == 1  # floor(0.25 x 4 blocks)
    replaced = {j for row in elastic.plan.adapter_ranks for j, a in enumerate(row) if a}
    assert replaced <= set(sens.candidates)
    # once distilled, another --max-replaced would contradict the checkpoint: refused
    with pytest.raises(CompressError, match=r"differs in: depth\) that its finished stages "
                                            r"\(depth, plan, distill, save\)"):
        compress(model_dir[0], out, config_of(argv(model_dir, out, "--max-replaced", "0.5",
                                                    budgets="1,0.6,0.4")))


def test_a_changed_setting_is_refused_once_the_distillation_has_begun(model_dir, tmp_path,
                                                                      monkeypatch):
    out = tmp_path / "out"

    def killed_in_distillation(*args, output_dir, **kwargs):
        (output_dir / "checkpoint").mkdir()  # as its first checkpoint would
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "distill", killed_in_distillation)
        with pytest.raises(KeyboardInterrupt):
            compress(model_dir[0], out, config_of(argv(model_dir, out)))
    assert "plan" in finished(out) and "distill" not in finished(out)
    with pytest.raises(CompressError, match=r"differs in: depth\) that its finished stages "
                                            r"\(depth, plan\) used and whose distillation "
                                            "has begun"):
        compress(model_dir[0], out, config_of(argv(model_dir, out, "--donor-window", "1")))
    assert (out / "stages" / "checkpoint").is_dir()  # the training is not thrown away


# ------------------------------------------------------------------ errors


def test_a_budget_the_joint_plan_cannot_reach_is_refused_before_distillation(
        model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(argv(model_dir, out, budgets="1,0.1")) == 2
    err = capsys.readouterr().err
    assert "budget 0.1 is out of reach of the joint plan: its smallest budget is 0." in err
    assert "--budgets" in err and "--max-replaced" in err, err
    assert "distill" not in finished(out) and not (out / "stages" / "checkpoint").exists()
    # as the message says, the same folder resumes with a reachable budget
    probes = counted(monkeypatch, pipeline, "probe_depth")
    assert main(argv(model_dir, out, budgets="1,0.3")) == 0
    assert probes == [] and isinstance(ElasticModel.from_pretrained(out).plan, JointPlan)


@pytest.mark.parametrize("option, value, expected", [
    ("--max-replaced", "1.5", "1.5 is out of range: must be in (0, 1)"),
    ("--max-replaced", "0", "0.0 is out of range: must be in (0, 1)"),
    ("--max-replaced", "half", "'half' is not a number"),
    ("--adapter-ranks", "0", "ranks must be >= 1 and strictly ascending"),
    ("--adapter-ranks", "16,8", "ranks must be >= 1 and strictly ascending"),
    ("--adapter-ranks", "8,x", "'x' in '8,x' is not a whole number"),
    ("--donor-window", "0", "must be >= 1")])
def test_bad_depth_values_are_clear_cli_errors(tmp_path, capsys, option, value, expected):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["compress", "no-such-model", "-o", str(out), "--depth", option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: " in err and expected in err, err
    assert not out.exists()


def test_depth_options_without_depth_are_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compress", "no-such-model", "-o", str(out), "--max-replaced", "0.3",
                 "--adapter-ranks", "4,8"]) == 2
    assert "--max-replaced, --adapter-ranks set the depth axis: add --depth" in \
        capsys.readouterr().err
    assert not out.exists()


def test_depth_settings_round_trip_and_key_the_resume_signature():
    config = CompressConfig(depth=DepthConfig(max_replaced=0.25, adapter_ranks=(4, 8)))
    assert CompressConfig.from_dict(config.to_dict()) == config
    assert config.signature("m")["depth"] == {"max_replaced": 0.25, "adapter_ranks": [4, 8],
                                              "donor_window": 4,
                                              "eigen_floor": DepthConfig.eigen_floor}
    assert CompressConfig().signature("m")["depth"] is None
    # the joint plan adds rank KLs to the depth probe's whole-vocabulary KLs
    assert config.probe.top_k == 0 and CompressConfig().probe.top_k > 0
    assert pipeline.FIRST_READER["depth"] == "depth"
