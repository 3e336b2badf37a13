"""`flexrank compress`: load → calibration → covariance → decompose → probe → [depth →]
plan → distill → save, each stage's result cached in the output folder so that a re-run
after a crash (or with more distillation steps) resumes from the last finished stage, and
a re-run of a finished compression loads its checkpoint.

With CompressConfig.depth (`flexrank compress --depth`, issue 18) the depth stage probes
weight-shared stand-ins for whole blocks (`flexrank.compress.depth.probe_depth`, on the
rank probe's batches), the plan stage makes a JointPlan (`flexrank.planning.depth`)
instead of a NestedPlan, and distillation trains the depth-elastic student
(`make_depth_elastic_`). The stand-ins' adapters are DataSVDs of W_pruned − W_donor
whitened by the pruned layers' input covariances; the block-by-block decompose keeps no
covariances, so the depth stage collects them again, from the original model on the
calibration set, for the candidate blocks' layers only (`depth_candidates`: one cosine
pass on the probe batches names them), and keeps them in stages/ for the stand-ins built
before distillation on this and later runs. A layer whose covariance is missing or
degenerate gets a plain-SVD adapter instead, with a warning (`depth.build_stand_in`).

    OUT/flexrank-compress.json   what was asked (the resume signature) and finished stages;
                                 written before any work, so that a run that fails or is
                                 killed early leaves a folder the next run can use
    OUT/stages/                  calibration tokens, covariances, decomposed factors,
                                 probe rows, depth probe and its covariances, plan,
                                 distillation checkpoint
    OUT/elastic/                 the ElasticModel checkpoint (written last, atomically)
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from flexrank.compress.blockwise import factorize_blockwise_
from flexrank.compress.calibration import (
    CalibrationError,
    calibration_data,
    model_batches,
    model_input_samples,
    takes_token_ids,
)
from flexrank.compress.config import (
    CompressConfig,
    DistillConfig,
    ProbeConfig,
    without_inert_probe_settings,
)
from flexrank.compress.covariance import CovarianceStats, collect_covariances
from flexrank.compress.depth import (
    block_list,
    depth_candidates,
    make_depth_elastic_,
    probe_depth,
)
from flexrank.compress.distill import (
    check_intermediate,
    distill,
    evaluate_budgets,
    stack_batches,
)
from flexrank.compress.elastic import META_FILE, ElasticModel, layer_specs, restructure_
from flexrank.compress.models import load_model
from flexrank.compress.offload import OFFLOAD_PREFIX
from flexrank.compress.probe import probe
from flexrank.compress.surgery import factorize_
from flexrank.io import atomic_path, check_writable, write_json_atomic
from flexrank.planning.depth import BlockSensitivity, JointPlan, joint_plan, smallest_budget
from flexrank.planning.planner import BUDGET_RTOL, NestedPlan
from flexrank.planning.planner import plan as make_plan
from flexrank.planning.sensitivity import Sensitivity
from flexrank.table import format_table

logger = logging.getLogger(__name__)

STATE_FILE = "flexrank-compress.json"
# "depth" runs only with CompressConfig.depth (a rank-only run never records it)
STAGES = ("calibration", "covariance", "decompose", "probe", "depth", "plan", "distill",
          "save")


# The first stage that reads each of CompressConfig.signature's settings: a changed setting
# re-runs that stage and the later ones (`_check_output` says when that is refused).
# (batch_size: teacher-sampled calibration text is generated in batches.)
FIRST_READER = {"model": "calibration", "calib": "calibration", "num_samples": "calibration",
                "seq_len": "calibration", "eval_samples": "calibration", "seed": "calibration",
                "batch_size": "calibration", "factorize": "decompose", "probe": "probe",
                "probe_samples": "probe", "depth": "depth", "budgets": "plan",
                "distill": "distill"}
# What an unfinished stage may have left in stages/ that a later run would pick up (the
# depth stage's covariances: of the candidates of its settings).
LEFTOVERS = {"probe": ("probe-partial.json",),
             "depth": ("depth-probe-partial.json", "depth-covariance.safetensors"),
             "distill": ("checkpoint",)}
# Stages whose results a changed setting never discards: the distillation (and with it
# its checkpoint) is the long part of a run; calibration and the factors are what every
# later stage stands on (a changed model, text or factorisation is another compression).
# A changed probe, depth or budget setting re-runs its finished stages before distillation.
KEPT_WORK = ("distill", "save")
BASE_WORK = ("calibration", "covariance", "decompose")


class CompressError(ValueError):
    """An output folder that cannot be used for this run."""


def canonical_signature(signature: dict) -> dict:
    """The signature with its budgets in one order (the plan sorts them anyway), so that
    `1,0.6,0.8` resumes a run started with `0.8,1,0.6`; probe settings that change nothing
    in the run asked for left out (`config.without_inert_probe_settings`), so that folders
    written before those settings existed resume."""
    out = {**signature, "budgets": sorted(float(b) for b in signature.get("budgets", ()))}
    if isinstance(signature.get("probe"), dict):
        out["probe"] = without_inert_probe_settings(signature["probe"])
    return out


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
        if not isinstance(state.get("signature"), dict) or not isinstance(state.get("done"), dict):
            raise ValueError("no 'signature' and 'done' objects")
    except (ValueError, AttributeError) as err:  # JSONDecodeError is a ValueError
        raise CompressError(f"{path} is damaged ({err}); delete {path.parent} to start "
                            "over") from None
    return state


def _check_output(out: Path, signature: dict) -> dict:
    """The state to run with in `out`: its own when the settings match; when they differ,
    its own less the finished stages that read a changed setting (FIRST_READER: that stage
    and every later one, run again with the new settings) as long as those are probe,
    depth or plan stages and the distillation has not begun (no finished distill stage, no
    distillation checkpoint); a fresh one for a new or empty folder. So a run whose plan
    failed (a budget out of reach) is continued with other budgets or depth settings,
    its calibration, factors and probes reused. Raises CompressError for a foreign folder,
    one whose calibration or factors used other settings, or one whose distillation
    began or finished with other settings."""
    signature = canonical_signature(signature)
    state_path = out / STATE_FILE
    if not state_path.is_file():
        if out.exists() and not out.is_dir():
            raise CompressError(f"{out} is a file; give a new or empty folder as the output")
        if out.exists() and _foreign_entries(out):
            raise CompressError(
                f"{out} is not empty and is not a FlexRank compress folder (no {STATE_FILE}); "
                "choose a new or empty output folder (flexrank compress -o, flexrank-export "
                "--work-dir)")
        return {"signature": signature, "done": {}}
    state = _read_state(state_path)
    stored = canonical_signature(state["signature"])
    changed = sorted(k for k in signature.keys() | stored.keys()
                     if stored.get(k) != signature.get(k))
    if not changed:
        return {**state, "signature": signature}
    first = min(STAGES.index(FIRST_READER.get(k, STAGES[0])) for k in changed)
    finished = [stage for stage in STAGES[first:] if stage in state["done"]]
    distilling = (out / "stages" / "checkpoint").exists()  # begun, unfinished
    if (any(stage in KEPT_WORK or stage in BASE_WORK for stage in finished) or distilling):
        what = ", ".join(finished) or "none"
        # the probe defaults changed on 2026-12-02 (BENCHMARKS.md, issue 20)
        old_defaults = ("; a folder from before the probe defaults changed resumes with "
                        "--probe-points 3 --probe-top-k 0 --probe-samples 4"
                        if {"probe", "probe_samples"} & set(changed) else "")
        raise CompressError(
            f"{out} holds a compression with other settings (differs in: {', '.join(changed)}) "
            f"that its finished stages ({what}) used"
            f"{' and whose distillation has begun' if distilling else ''}; delete that "
            f"folder to start over, or choose another output folder{old_defaults}")
    if finished:
        logger.warning("%s: settings changed (%s): running %s again with the new settings",
                       out, ", ".join(changed), ", ".join(finished))
    else:
        logger.info("%s: settings changed (%s); no stage that reads them had finished: "
                    "continuing", out, ", ".join(changed))
    for stage in STAGES[first:]:
        for name in LEFTOVERS.get(stage, ()):
            _remove(out / "stages" / name)
    done = {k: v for k, v in state["done"].items() if k not in finished}
    return {"signature": signature, "done": done}


def _foreign_entries(out: Path) -> list[Path]:
    """What in `out` a compress run did not write. An empty stages/ is left by a run of an
    earlier version that failed before it wrote its state file (it wrote it later)."""
    return [p for p in out.iterdir()
            if not (p.name == "stages" and p.is_dir() and not any(p.iterdir()))]


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


class Stages:
    """Runs stages once: a finished stage is recorded with its wall time and skipped later."""

    def __init__(self, out: Path, state: dict):
        self.out, self.state = out, state
        self.dir = out / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.times: dict[str, float] = {}

    @classmethod
    def claim(cls, out: Path, signature: dict) -> Stages:
        """Check `out` (see `_check_output`) and write its state file before any work, so
        that a run failing or killed at any later point leaves a folder that the next run
        resumes (same settings) or continues with new ones (`_check_output`)."""
        state = _check_output(out, signature)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / STATE_FILE, state)
        return cls(out, state)

    def done(self, name: str) -> bool:
        return name in self.state["done"]

    def finish(self, name: str, started: float, **record) -> None:
        """Mark `name` finished, with its seconds and `record` (JSON-ready)."""
        self.times[name] = time.perf_counter() - started
        self.state["done"][name] = {"seconds": self.times[name], **record}
        write_json_atomic(self.out / STATE_FILE, self.state)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None):
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"json": json.dumps(meta or {})})


def _calibration(stages: Stages, cfg: CompressConfig, model, tokenizer, model_dir=None):
    """(train, held-out) samples: token ids (N, seq_len), or for a model that does not
    read text its inputs (N, ...) from --calib's files (`model_input_samples`; the image
    processor of `model_dir`), a seeded choice of num_samples + eval_samples of them."""
    path = stages.dir / "calibration.safetensors"
    if stages.done("calibration"):
        data = load_file(str(path))
        return data["train"], data["eval"]
    started = time.perf_counter()
    total = cfg.num_samples + cfg.eval_samples
    if not takes_token_ids(model):
        try:
            samples = model_input_samples(cfg.calib, model, model_dir, total, cfg.seed)
        except CalibrationError as err:
            raise CalibrationError(f"{err} ({cfg.num_samples} calibration + "
                                   f"{cfg.eval_samples} held-out samples are needed: "
                                   "flexrank compress --samples, --eval-samples)") from None
        train, held_out = samples[:cfg.num_samples], samples[cfg.num_samples:]
    elif cfg.calib == "teacher":
        batches = calibration_data(tokenizer, "teacher", model=model, num_samples=total,
                                   seq_len=cfg.seq_len, seed=cfg.seed, batch_size=cfg.batch_size)
        ids = torch.cat([b["input_ids"] for b in batches])
        train, held_out = ids[:cfg.num_samples], ids[cfg.num_samples:]
    else:  # calibrate on the first 80 % of the text, hold out the last 10 %
        # model=: a seq_len beyond its positions is refused before the stage is finished
        train = torch.cat([b["input_ids"] for b in calibration_data(
            tokenizer, cfg.calib, model=model, num_samples=cfg.num_samples,
            seq_len=cfg.seq_len, seed=cfg.seed, span=(0.0, 0.8))])
        held_out = torch.cat([b["input_ids"] for b in calibration_data(
            tokenizer, cfg.calib, model=model, num_samples=cfg.eval_samples,
            seq_len=cfg.seq_len, seed=cfg.seed, span=(0.9, 1.0), held_out=True)]) \
            if cfg.eval_samples \
            else train[:0]
    _save_tensors(path, {"train": train, "eval": held_out})
    stages.finish("calibration", started)
    return train, held_out


def _covariance(stages: Stages, model, batches) -> CovarianceStats:
    path = stages.dir / "covariance.safetensors"
    if stages.done("covariance"):
        meta = json.loads(_safetensors_meta(path))
        return CovarianceStats(load_file(str(path)), meta["counts"], meta["leader_of"])
    started = time.perf_counter()
    stats = collect_covariances(model, batches)
    _save_tensors(path, stats.sums, {"counts": stats.counts, "leader_of": stats.leader_of})
    stages.finish("covariance", started)
    return stats


def _safetensors_meta(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["json"]


def student_copy(teacher, share: bool):
    """A copy of `teacher` to factorise. With `share`, every parameter and buffer is the
    teacher's own tensor (only the modules are new): factorising swaps the student's
    modules, so the teacher is untouched and the untouched modules (embeddings, norms, LM
    head) are held once. Share only when those tensors are not trained (train_all off)
    and not sharded (FSDP replaces the student's parameters by flat shards)."""
    if not share:
        return copy.deepcopy(teacher)
    memo = {id(t): t for t in itertools.chain(teacher.parameters(), teacher.buffers())}
    return copy.deepcopy(teacher, memo)


def _shares_weights(cfg: CompressConfig, teacher) -> bool:
    """Whether the student may hold the teacher's own tensors (`student_copy`): not when
    they are trained (train_all), sharded (FSDP), or in half precision (distillation
    upcasts every student tensor to float32 in place, so the teacher's would change)."""
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    half = any(p.dtype in (torch.float16, torch.bfloat16) for p in teacher.parameters())
    return not (cfg.distill.train_all or fsdp or half)


def _decompose(stages: Stages, cfg: CompressConfig, teacher, train_batches):
    """The factorised student. DataSVD runs block by block (`factorize_blockwise_`: one
    block's covariances in memory at a time, none written to disk); a folder whose
    covariance stage finished under an earlier version decomposes from its saved sums."""
    student = student_copy(teacher, share=_shares_weights(cfg, teacher))
    path = stages.dir / "decomposed.safetensors"
    if stages.done("decompose"):
        restructure_(student, json.loads(_safetensors_meta(path)))
        load_safetensors_model(student, str(path), strict=False)
        return student
    started = time.perf_counter()
    saved_sums = stages.done("covariance") and (stages.dir / "covariance.safetensors").exists()
    if saved_sums:
        factorize_(student, _covariance(stages, teacher, train_batches), cfg.factorize)
    elif cfg.factorize.method == "data":
        # "auto" offloads into the output folder (a disk, where /tmp may be RAM-backed);
        # a killed run's offload folders there are ours and hold nothing to resume from
        for stale in stages.dir.glob(f"{OFFLOAD_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        factorize_blockwise_(student, train_batches, cfg.factorize,
                             offload_dir=cfg.offload_hidden, auto_dir=stages.dir)
    else:
        factorize_(student, None, cfg.factorize)
    with atomic_path(path) as tmp:
        save_safetensors_model(student, str(tmp), metadata={"json": json.dumps(
            layer_specs(student))})
    if not saved_sums:  # block by block, the covariances are part of decompose (timed there);
        # marked only once the factors are saved: a failed save must not leave a finished
        # covariance stage without its file for the next run to read
        stages.finish("covariance", time.perf_counter())
    stages.finish("decompose", started)
    return student


def _probe(stages: Stages, cfg: CompressConfig, student, teacher, probe_batches
           ) -> Sensitivity:
    sens_path = stages.dir / "sensitivity.json"
    if stages.done("probe"):
        return Sensitivity.load(sens_path)
    started = time.perf_counter()
    sens = probe(student, teacher, probe_batches, cfg.probe,
                 cache_path=stages.dir / "probe-partial.json")
    sens.save(sens_path)
    stages.finish("probe", started)
    return sens


DEPTH_COVARIANCE = "depth-covariance.safetensors"


def _depth_covariances(stages: Stages, teacher, train_batches, candidates: list[int]
                       ) -> CovarianceStats:
    """Input covariances of the candidate blocks' linear layers in the original model
    (`teacher`) over the calibration set: read from stages/ when saved for these
    candidates, else collected (one forward pass of the calibration set) and saved."""
    path = stages.dir / DEPTH_COVARIANCE
    if path.is_file():
        meta = json.loads(_safetensors_meta(path))
        if meta.get("candidates") == list(candidates):
            return CovarianceStats(load_file(str(path)), meta["counts"], meta["leader_of"])
    prefix, _ = block_list(teacher)
    heads = tuple(f"{prefix}.{c}." for c in candidates)
    stats = collect_covariances(teacher, train_batches,
                                filter_fn=lambda name, module: name.startswith(heads))
    _save_tensors(path, stats.sums, {"counts": stats.counts, "leader_of": stats.leader_of,
                                     "candidates": list(candidates)})
    return stats


def _depth(stages: Stages, cfg: CompressConfig, student, teacher, train_batches,
           probe_batches) -> tuple[BlockSensitivity, CovarianceStats]:
    """The depth stage: the candidate blocks (`depth_candidates`), their layers' input
    covariances (`_depth_covariances`), and the depth probe on the rank probe's batches,
    whose partial results survive a kill (stages/depth-probe-partial.json)."""
    path = stages.dir / "block-sensitivity.json"
    if stages.done("depth"):
        depth = BlockSensitivity.load(path)
        return depth, _depth_covariances(stages, teacher, train_batches, depth.candidates)
    started = time.perf_counter()
    candidates = depth_candidates(student, probe_batches, cfg.depth)
    stats = _depth_covariances(stages, teacher, train_batches, candidates)
    depth = probe_depth(student, probe_batches, stats, cfg.depth,
                        cache_path=stages.dir / "depth-probe-partial.json")
    depth.save(path)
    stages.finish("depth", started)
    return depth, stats


def _plan(stages: Stages, cfg: CompressConfig, sens: Sensitivity,
          depth: BlockSensitivity | None) -> NestedPlan | JointPlan:
    plan_path = stages.dir / "plan.json"
    if stages.done("plan"):
        return JointPlan.load(plan_path) if depth is not None else NestedPlan.load(plan_path)
    started = time.perf_counter()
    if depth is None:
        plan = make_plan(sens, budgets=list(cfg.budgets))
        plan.save(plan_path)
        plan.save_heatmap(stages.out / "rank-heatmap.png")
    else:
        _check_reachable(cfg, sens, depth)
        plan = joint_plan(sens, depth, budgets=list(cfg.budgets))
        plan.save(plan_path)
        _remove(stages.out / "rank-heatmap.png")  # of a rank-only plan made here before
    stages.finish("plan", started)
    return plan


def _check_reachable(cfg: CompressConfig, sens: Sensitivity, depth: BlockSensitivity):
    """Raises ValueError, before any training, for a budget below what the joint plan
    reaches, naming the budget, the smallest reachable one and the options that lower it."""
    low = smallest_budget(sens, depth)
    out_of_reach = [b for b in sorted(cfg.budgets) if b < low * (1 - BUDGET_RTOL)]
    if out_of_reach:
        ranks = cfg.depth.adapter_ranks
        raise ValueError(
            f"budget {out_of_reach[0]:g} is out of reach of the joint plan: its smallest "
            f"budget is {low:.4f} (the {len(depth.candidates)} candidate block"
            f"{'s' if len(depth.candidates) != 1 else ''} of "
            f"--max-replaced {cfg.depth.max_replaced:g} replaced at adapter rank {ranks[0]}, "
            "every other layer at its lowest candidate rank); give budgets of at least "
            f"{low:.4f} (--budgets), or let more blocks be replaced (a larger "
            "--max-replaced), or a smaller first --adapter-ranks; the same -o resumes "
            "from the finished stages")


def whole_model_params(teacher, nested: NestedPlan | JointPlan) -> list[int]:
    """Whole-model parameters per budget: the plan's factorised layers (a JointPlan's: the
    kept layers and the stand-ins' adapters and scales) plus everything else (embeddings,
    norms, the LM head; tied tensors counted once; a stand-in's norms take the place of
    its block's)."""
    unique = {p.data_ptr(): p.numel() for p in teacher.parameters()}
    factorised_dense = sum(m * n for m, n in nested.shapes)
    rest = sum(unique.values()) - factorised_dense
    return [rest + int(p) for p in nested.params]


def compress(model_spec, out_dir, config: CompressConfig | None = None,
             dtype=None) -> tuple[ElasticModel, str]:
    """Run (or resume) the whole pipeline; return the elastic model and a summary table.
    A folder whose run finished with these settings (distillation steps included) returns
    its saved checkpoint and summary without loading the model (`_finished_run`).

    `dtype` (e.g. torch.bfloat16) loads the model in that dtype (`load_model`): a bf16
    model is compressed in bf16, half the memory, with float64 maths per layer; it is part
    of the resume signature. None: the checkpoint's own (float32 for the GGUF alias).

    Every setting is checked (by CompressConfig, and the calibration source exists) and the
    output folder checked writable and claimed (`Stages.claim`) before the model is loaded.
    Raises CompressError for an output folder this run cannot use, flexrank.io.WriteError
    (an OSError) for one that cannot be written, CalibrationError for a missing calibration
    source, ModelLoadError for a model that cannot be loaded.
    """
    config = config or CompressConfig()
    out = Path(out_dir)
    model_id = str(model_spec)
    if config.calib != "teacher" and not Path(config.calib).exists():
        raise CalibrationError(f"calibration source {config.calib!r} does not exist; pass a "
                               "text or .jsonl file, a datasets folder, or 'teacher'")
    check_writable(out, "the compress output folder")  # a read-only or full disk: now
    if config.offload_hidden not in (None, "auto"):
        check_writable(config.offload_hidden, "the --offload-hidden folder")
    signature = config.signature(model_id)
    if dtype is not None:
        signature["dtype"] = str(dtype)  # a float32 folder does not resume as bf16
    stages = Stages.claim(out, signature)
    finished = _finished_run(stages, config)
    if finished is not None:
        return finished
    started = time.perf_counter()
    teacher, tokenizer = load_model(model_spec, dtype=dtype)
    stages.times["load"] = time.perf_counter() - started
    teacher.requires_grad_(False)
    if config.depth is not None:
        block_list(teacher)  # a model without a stack of blocks: refused before any work
    model_dir = model_spec if isinstance(model_spec, (str, os.PathLike)) and \
        Path(model_spec).is_dir() else None
    train_ids, eval_ids = _calibration(stages, config, teacher, tokenizer, model_dir)
    train = model_batches(train_ids, config.batch_size, teacher)
    if config.distill.steps:  # refused before DataSVD and probing, not at distillation
        check_intermediate(config.distill, teacher, stack_batches(train[:1], teacher)[1])
    student = _decompose(stages, config, teacher, train)
    probe_batches = model_batches(train_ids[:config.probe_samples], config.batch_size, teacher)
    sens = _probe(stages, config, student, teacher, probe_batches)
    depth, depth_stats = _depth(stages, config, student, teacher, train, probe_batches) \
        if config.depth is not None else (None, None)
    nested = _plan(stages, config, sens, depth)
    held_out = model_batches(eval_ids, config.batch_size, teacher) if len(eval_ids) else None
    if depth is not None:  # the blocks the plan replaces become switches over stand-ins
        make_depth_elastic_(student, nested, depth_stats, config.depth.eigen_floor)

    qat = config.distill.qat  # recorded in the checkpoint, for the exporters
    elastic = ElasticModel(student, nested, tokenizer, model_id=model_id,
                           qat={"scheme": str(qat), "block_size": config.distill.qat_block_size}
                           if qat else None)
    before = evaluate_budgets(elastic, teacher, held_out) if held_out else None
    started = time.perf_counter()
    distill(student, teacher, nested, train, config.distill, output_dir=stages.dir)
    stages.finish("distill", started)
    after = evaluate_budgets(elastic, teacher, held_out) if held_out else None
    started = time.perf_counter()
    _remove(out / "summary.txt")  # an earlier run's, which `_finished_run` must not return
    elastic.save_pretrained(out / "elastic")
    stages.finish("save", started, distill=_trained_with(config))  # see _finished_run
    summary = summary_table(teacher, nested, before, after, stages.times)
    with atomic_path(out / "summary.txt") as tmp:  # a full disk leaves no half summary
        tmp.write_text(summary + "\n")
    return elastic, summary


def _trained_with(config: CompressConfig) -> dict:
    """The distillation settings a saved checkpoint was trained with, those the resume
    signature leaves out included (steps may grow, full_budget "anchor" refits again)."""
    data = config.distill.to_dict()
    for key in ("eval_every", "checkpoint_every"):  # change no weight
        data.pop(key)
    if not data["balance_factors"]:  # as folders that finished before it was a setting
        data.pop("balance_factors")
    return data


def _finished_run(stages: Stages, config: CompressConfig) -> tuple[ElasticModel, str] | None:
    """(the saved ElasticModel, its summary) when this folder's run finished with exactly
    these settings (the signature is checked by `Stages.claim`; the distillation settings
    it leaves out, such as more steps, are compared here), so that a second run loads the
    checkpoint instead of loading the model, evaluating, resuming the distillation and
    refitting β = 1 again; None when the run must go on or its files are missing."""
    elastic_dir, summary = stages.out / "elastic", stages.out / "summary.txt"
    saved = stages.state["done"].get("save", {})
    if not (saved.get("distill") == _trained_with(config)
            and (elastic_dir / META_FILE).is_file() and summary.is_file()):
        return None
    logger.info("%s: this compression finished earlier; loading its checkpoint", stages.out)
    return ElasticModel.from_pretrained(elastic_dir), summary.read_text().rstrip("\n")


# evaluate_budgets' figures by objective: language models (KL, perplexity), encoders
# (feature loss, pooled cosine to the teacher), classifiers (class KL, top-1 agreement)
FIGURE_NAMES = {"kl": "KL", "ppl": "ppl", "loss": "loss", "cosine": "cosine", "top1": "top-1"}


def replaced_blocks(plan, beta: float) -> str:
    """The blocks a JointPlan replaces at `beta`, "3<1@16 5<4@8" (block<donor@adapter
    rank, by the blocks' indices), "-" for none or a NestedPlan."""
    if not isinstance(plan, JointPlan):
        return "-"
    return " ".join(f"{block.rsplit('.', 1)[-1]}<{donor.rsplit('.', 1)[-1]}@{rank}"
                    for block, (donor, rank) in plan.replaced_for(beta).items()) or "-"


def summary_table(teacher, nested: NestedPlan | JointPlan, before, after, times: dict) -> str:
    first = next(iter(before.values())) if before else {}
    figures = [k for k in ("kl", "ppl") if k in first] or [k for k in FIGURE_NAMES if k in first]
    whole = whole_model_params(teacher, nested)
    dense_whole = sum({p.data_ptr(): p.numel() for p in teacher.parameters()}.values())
    rows = []
    for i, beta in enumerate(nested.budgets):
        row = [beta, f"{nested.params[i]:,}", f"{whole[i]:,}", whole[i] / dense_whole]
        if isinstance(nested, JointPlan):
            row.append(replaced_blocks(nested, beta))
        if before and after:
            row += [table[beta][key] for key in figures for table in (before, after)]
        rows.append(row)
    headers = ["budget", "kept params", "whole-model params", "whole kept"]
    if isinstance(nested, JointPlan):
        headers.append("replaced (block<donor@adapter rank)")
    headers += [f"{FIGURE_NAMES[key]} {when}" for key in figures
                for when in ("before", "after")] if before and after else []
    table = format_table(headers, rows, title="\nFlexRank compress: held-out figures per budget "
                                              "(before = DataSVD + plan, after = distilled)")
    stage_rows = [[name, seconds] for name, seconds in times.items()]
    return table + "\n" + format_table(["stage", "seconds (this run)"], stage_rows,
                                       title="\nStages")


def fast_compress_config(budgets=(1.0, 0.8, 0.6, 0.4)):
    """`flexrank-export`'s compress settings for a plain model: small enough that the
    README demo (compress + export + validation + bench of SmolLM2-135M) fits in 15
    minutes on 2 cores. Quality is that of a short run; `flexrank compress` with its own
    defaults (128 × 256 calibration tokens, 200 steps) gives better budgets."""
    from flexrank.compress.config import CompressConfig

    return CompressConfig(
        calib="teacher", num_samples=32, seq_len=128,  # teacher text: no data file needed
        eval_samples=4, batch_size=8, budgets=tuple(budgets),
        # the demo's measured figures (BENCHMARKS.md, issue 17) were taken with these
        probe=ProbeConfig(mode="fast", num_levels=8, probe_points=2, top_k=0),
        probe_samples=2,
        distill=DistillConfig(steps=20, batch_size=2, checkpoint_every=0))
