"""Two gloo processes on the CPU (torchrun + Accelerate) give the same covariance, the same
fisher probe and the same parameters after N distillation steps as one process with the
same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent


def _launch(worker_args: list[str], procs: int, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
           "--master_port", str(port), str(HERE / "dist_worker.py"), *worker_args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_fsdp_resumes_a_one_process_checkpoint_and_matches_one_process(tmp_path):
    """FSDP2 (full shard) through Accelerate's own preparation (torch's fully_shard, on
    gloo here: Accelerate 1.x would run an FSDP plugin on CPU as plain DDP, so the worker
    tells its state FSDP; on GPUs it asks for FSDP as a user's config does). One process
    trains 2 of 4 steps and stops after its checkpoint, as a killed run would; two FSDP
    processes resume it (whole tensors scattered into shards, AdamW's moments too) to step
    4, gather the shards into a last checkpoint and into the caller's model. The weights and
    that checkpoint against one process that ran all 4 steps uninterrupted (tolerances as
    for DDP: the same sums in another order)."""
    run_dir = tmp_path / "run"
    stopped = _launch([str(tmp_path / "stopped.safetensors"), "--output-dir", str(run_dir),
                       "--stop-after", "2"], 1, 29507)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and not (tmp_path / "stopped.safetensors").exists()

    out = tmp_path / "fsdp.safetensors"
    done = _launch([str(out), "--fsdp", "--output-dir", str(run_dir)], 2, 29508)
    assert done.returncode == 0, done.stderr[-3000:]
    one, one_dir = tmp_path / "one.safetensors", tmp_path / "one"
    assert _launch([str(one), "--output-dir", str(one_dir)], 1, 29509).returncode == 0
    resumed, reference = load_file(str(out)), load_file(str(one))
    assert int(resumed["steps_run"]) == 2 and int(reference["steps_run"]) == 4
    _compare(reference, resumed)
    # the last checkpoints (the trained factors before the full budget's refit, and AdamW's
    # moments), gathered from the shards, against the one process's
    for name in ("weights", "optimizer"):
        gathered = load_file(str(run_dir / "checkpoint" / f"{name}.safetensors"))
        reference = load_file(str(one_dir / "checkpoint" / f"{name}.safetensors"))
        assert gathered.keys() == reference.keys() and len(gathered) >= 28
        for key, value in reference.items():
            torch.testing.assert_close(gathered[key], value, rtol=1e-4, atol=1e-5)
    assert json.loads((run_dir / "checkpoint" / "state.json").read_text())["step"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_a_nan_loss_on_one_process_stops_every_process_with_its_cause(tmp_path, fsdp):
    """Process 1's teacher gives NaN logits, so its loss alone is NaN: both processes
    raise NonFiniteError at the same step (process 1 naming the teacher, process 0 naming
    process 1), neither left waiting in a collective (torchrun would kill it first, and
    it would write nothing)."""
    out = tmp_path / "nan.safetensors"
    done = _launch([str(out), "--nan-rank", "1", *(["--fsdp"] if fsdp else [])], 2,
                   29510 + fsdp)
    assert done.returncode != 0
    reports = {rank: Path(f"{out}.rank{rank}.txt") for rank in (0, 1)}
    assert all(path.is_file() for path in reports.values()), done.stderr[-3000:]
    cause, other = reports[1].read_text(), reports[0].read_text()
    assert cause.startswith("distillation step 0: the loss at budget ")
    assert "the teacher's outputs are not finite" in cause
    assert other.startswith("distillation step 0: the loss is NaN/inf on process(es) [1] "
                            "of 2")
    assert not out.exists()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    results = {}
    for procs in (1, 2):
        out = tmp_path / f"procs{procs}.safetensors"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
               "--master_port", str(29500 + procs), str(HERE / "dist_worker.py"), str(out)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        results[procs] = load_file(str(out))
    _compare(results[1], results[2])


def _compare(one: dict, two: dict) -> None:
    """Two processes' covariances, probe rows and trained weights against one process's."""
    assert one.keys() == two.keys()
    assert int(one["tokens"]) == int(two["tokens"]) > 0
    for key in one:
        if key.startswith("cov."):
            torch.testing.assert_close(two[key], one[key], rtol=1e-9, atol=1e-9)
    rows = [k for k in one if k.startswith(("probe.", "fisher."))]
    assert len(rows) == 28 and all(one[k][:-1].min() > 0 for k in rows)
    for key in rows:  # the same draws, summed in another order; the same measured ranks
        torch.testing.assert_close(two[key], one[key], rtol=1e-9, atol=0)
    assert int(one["eval_step"]) == int(two["eval_step"]) == 4
    evals = [k for k in one if k.startswith("eval.")]
    assert len(evals) == 3 and all(float(one[k]) > 0 for k in evals)
    for key in evals:  # every budget's held-out KL at step 4, run by every FSDP process
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-7)
    params = [k for k in one if k.startswith("param.")]
    assert params
    trained = 0
    for key in params:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
        trained += not torch.equal(one[key], one[key.replace("param.", "initial.")])
    assert trained >= 28  # every nested factor (14 layers x U, V) moved in training
