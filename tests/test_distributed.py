"""Two gloo processes on the CPU (torchrun + Accelerate) give the same covariance and the
same parameters after N distillation steps as one process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent


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
    one, two = results[1], results[2]
    assert one.keys() == two.keys()
    assert int(one["tokens"]) == int(two["tokens"]) > 0
    for key in one:
        if key.startswith("cov."):
            torch.testing.assert_close(two[key], one[key], rtol=1e-9, atol=1e-9)
    params = [k for k in one if k.startswith("param.")]
    assert params
    trained = 0
    for key in params:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
        trained += not torch.equal(one[key], one[key.replace("param.", "initial.")])
    assert trained >= 28  # every nested factor (14 layers x U, V) moved in training
