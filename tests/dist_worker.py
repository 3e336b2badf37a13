"""Run under `torchrun --nproc_per_node N`: covariance on this rank's shard of the batches
(all-reduced), a fisher probe with one measured rank per layer (draws and layers split
over the ranks) and a few distillation steps on this rank's slice of each global batch.
Rank 0 writes the results to OUT. Used by test_distributed.py.

    dist_worker.py OUT [--fsdp] [--output-dir DIR] [--stop-after STEP] [--nan-rank R]

--fsdp: FSDP2 (full shard) through Accelerate. --output-dir: distil with checkpoints there
(every 2 steps), resuming from one found there. Held-out figures every 2 steps.
--stop-after STEP: every process stops right after the checkpoint of STEP is written, as a
killed run would, and writes nothing. --nan-rank R: the teacher's logits are NaN on
process R only (so is its loss); each process writes the NonFiniteError it raises to
OUT.rank<i>.txt and exits with status 3.
"""

import argparse
import math
from pathlib import Path

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType
from elastic_fixtures import tiny_elastic
from safetensors.torch import save_file

import flexrank.compress.distill as distill_module
from flexrank.compress.config import DistillConfig, ProbeConfig
from flexrank.compress.covariance import collect_covariances
from flexrank.compress.distill import NonFiniteError, distill
from flexrank.compress.probe import probe

STEPS = 4


class Stopped(Exception):
    """Raised on every process after the --stop-after checkpoint."""


def make_accelerator(fsdp: bool) -> Accelerator:
    if not fsdp:
        return Accelerator(cpu=True)
    # as examples/accelerate/fsdp.yaml: full shard, one unit per transformer block
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
    if torch.cuda.is_available():
        return Accelerator(fsdp_plugin=plugin)
    # Accelerate 1.x runs an FSDP plugin on CPU as plain DDP (MULTI_CPU); torch's
    # fully_shard runs on gloo, so the state is told FSDP once the process group is up:
    # prepare() then shards through Accelerate's own FSDP2 path (fsdp2_prepare_model)
    accelerator = Accelerator(cpu=True)
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    assert accelerator.is_fsdp2
    return accelerator


def stop_after(step: int) -> None:
    real = distill_module._checkpoint

    def checkpoint_then_stop(accelerator, ckpt, done, *args):
        real(accelerator, ckpt, done, *args)
        if done == step:
            raise Stopped
    distill_module._checkpoint = checkpoint_then_stop


def run(out: Path, fsdp: bool = False, output_dir: Path | None = None,
        stop: int | None = None, nan_rank: int | None = None) -> None:
    # built before the process group exists, so each rank decomposes from its own full sums
    student, teacher, plan, train, held_out = tiny_elastic(seed=7)
    initial = {k: v.detach().clone() for k, v in student.state_dict().items()}
    accelerator = make_accelerator(fsdp)
    rank, world = accelerator.process_index, accelerator.num_processes
    stats = collect_covariances(teacher, train[rank::world], progress=False)
    # 5 draws: an uneven split over 2 processes; the estimate alone, and rescaled to one
    # measured rank per layer (those layers split over the processes)
    estimate = probe(student, teacher, train[:2], ProbeConfig(mode="fisher", num_levels=4,
                     fisher_draws=5), progress=False)
    sens = probe(student, teacher, train[:2], ProbeConfig(mode="fisher", num_levels=4,
                 fisher_draws=5, fisher_points=1), progress=False)
    config = DistillConfig(steps=STEPS, batch_size=4, lr=1e-3, warmup_steps=1,
                           checkpoint_every=2 if output_dir else 0, eval_every=2)
    if stop is not None:
        stop_after(stop)
    if nan_rank is not None:
        if rank == nan_rank:
            teacher.lm_head.register_forward_hook(lambda module, args, out: out * math.nan)
        try:
            distill(student, teacher, plan, train, config, accelerator=accelerator,
                    progress=False)
        except NonFiniteError as err:
            Path(f"{out}.rank{rank}.txt").write_text(str(err))
            raise SystemExit(3) from None
        return
    try:
        result = distill(student, teacher, plan, train, config, eval_batches=held_out,
                         accelerator=accelerator, output_dir=output_dir, progress=False)
    except Stopped:
        return
    if accelerator.is_main_process:
        tensors = {f"cov.{k}": v for k, v in stats.sums.items()}
        tensors |= {f"param.{k}": v.detach().clone() for k, v in student.state_dict().items()
                    if "lm_head" not in k}
        tensors |= {f"initial.{k}": v for k, v in initial.items() if "lm_head" not in k}
        tensors |= {f"probe.{name}": torch.as_tensor(sens.errors[i])
                    for i, name in enumerate(sens.layer_names)}
        tensors |= {f"fisher.{name}": torch.as_tensor(estimate.errors[i])
                    for i, name in enumerate(estimate.layer_names)}
        tensors["tokens"] = torch.tensor([stats.num_tokens])
        tensors["steps_run"] = torch.tensor([len(result.losses)])  # by this launch
        last = result.evals[-1]  # held-out KL at the last step, before the refit
        tensors["eval_step"] = torch.tensor([last["step"]])
        tensors |= {f"eval.{beta}": torch.tensor([figures["kl"]])
                    for beta, figures in last["budgets"].items()}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--output-dir", type=Path, default=None)
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--nan-rank", type=int, default=None)
    args = parser.parse_args()
    run(args.out, args.fsdp, args.output_dir, args.stop_after, args.nan_rank)
