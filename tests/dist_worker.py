"""Run under `torchrun --nproc_per_node N`: covariance on this rank's shard of the batches
(all-reduced), a fisher probe with one measured rank per layer (draws and layers split
over the ranks) and a few distillation steps on this rank's slice of each global batch.
Rank 0 writes the results to argv[1]. With `--fsdp` as argv[2], Accelerate is asked for
FSDP (full shard); where it gives another distributed type, rank 0 writes argv[1] + ".skip"
with what it gave instead and nothing runs. Used by test_distributed.py."""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from elastic_fixtures import tiny_elastic
from safetensors.torch import save_file

from flexrank.compress.config import DistillConfig, ProbeConfig
from flexrank.compress.covariance import collect_covariances
from flexrank.compress.distill import distill
from flexrank.compress.probe import probe

STEPS = 4


def make_accelerator(fsdp: bool) -> Accelerator:
    if not fsdp:
        return Accelerator(cpu=True)
    from accelerate import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True)
    return Accelerator(cpu=not torch.cuda.is_available(), fsdp_plugin=plugin)


def run(out: Path, fsdp: bool = False) -> None:
    # built before the process group exists, so each rank decomposes from its own full sums
    student, teacher, plan, train, _ = tiny_elastic(seed=7)
    initial = {k: v.detach().clone() for k, v in student.state_dict().items()}
    accelerator = make_accelerator(fsdp)
    if fsdp and accelerator.distributed_type != "FSDP":
        if accelerator.is_main_process:
            Path(f"{out}.skip").write_text(json.dumps({"distributed_type": str(
                accelerator.distributed_type)}))
        return
    rank, world = accelerator.process_index, accelerator.num_processes
    stats = collect_covariances(teacher, train[rank::world], progress=False)
    # 5 draws: an uneven split over 2 processes; the estimate alone, and rescaled to one
    # measured rank per layer (those layers split over the processes)
    estimate = probe(student, teacher, train[:2], ProbeConfig(mode="fisher", num_levels=4,
                     fisher_draws=5), progress=False)
    sens = probe(student, teacher, train[:2], ProbeConfig(mode="fisher", num_levels=4,
                 fisher_draws=5, fisher_points=1), progress=False)
    config = DistillConfig(steps=STEPS, batch_size=4, lr=1e-3, warmup_steps=1,
                           checkpoint_every=0)
    distill(student, teacher, plan, train, config, accelerator=accelerator, progress=False)
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
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out))


if __name__ == "__main__":
    run(Path(sys.argv[1]), fsdp=sys.argv[2:] == ["--fsdp"])
