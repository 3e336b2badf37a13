"""SIGKILL at each stage (issue 21, "Done when"): a real `flexrank-export` process on a tiny
checkpoint is killed as each of its five stages starts. Whatever stage it died in, the
output folder holds no bundle that checks as finished, and the same command then succeeds
and clears the staging folder the killed run could not. (An export into an existing bundle is
refused by the CLI; the API's replacement of one is tested in test_bundle_faults.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flexrank.exporters import lock_file
from flexrank.manifest import MissingFileError, load_manifest

STAGES = 5  # flexrank-export prints "[k/5] <stage> ..." as each stage starts


def export_command(checkpoint: Path, out: Path, budget: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from flexrank.cli import export_main; "
            "sys.exit(export_main(sys.argv[1:]))", str(checkpoint), "--profile", "pixel8",
            "--format", "onnx", "--budget", budget, "-o", str(out)]


def held_export_command(checkpoint: Path, out: Path, budget: str, stage: int) -> list[str]:
    """`export_command`, its stage `stage` waiting 60 s once announced: the SIGKILL sent on
    reading the announcement lands inside that stage, not after it (the manifest stage takes
    milliseconds, which a busy host's scheduling can exceed)."""
    command = export_command(checkpoint, out, budget)
    command[2] = ("import sys, time; import flexrank.cli.export as e; start = e.Stages.start; "
                  f"e.Stages.start = lambda self, name: (start(self, name), "
                  f"self.index == {stage} and time.sleep(60)); "
                  "from flexrank.cli import export_main; sys.exit(export_main(sys.argv[1:]))")
    return command


def run_and_kill_at(command: list[str], stage: int) -> None:
    """Start `command`; SIGKILL it when it announces stage `stage` (or let it finish)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)
    seen = []
    try:
        for line in process.stdout:
            seen.append(line)
            if line.startswith(f"[{stage}/{STAGES}]") and line.rstrip().endswith("..."):
                process.send_signal(signal.SIGKILL)
                break
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()
    assert process.returncode == -signal.SIGKILL, \
        f"the export ended before stage {stage}: {''.join(seen)[-2000:]}"


@pytest.mark.parametrize("stage", range(1, STAGES + 1))
def test_export_killed_at_each_stage_leaves_no_bundle_and_reruns(checkpoint, tmp_path, stage):
    dist = tmp_path / "dist"
    run_and_kill_at(held_export_command(checkpoint, dist, "0.8", stage), stage)
    with pytest.raises(MissingFileError, match="not a finished FlexRank bundle"):
        load_manifest(dist)
    # the same command again succeeds (no stale lock, no folder in the way) and clears
    # what the killed one could not: its half-built staging folder
    done = subprocess.run(export_command(checkpoint, dist, "0.8"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_manifest(dist).deployment.chosen_beta == pytest.approx(0.8)
    assert sorted(p.name for p in tmp_path.iterdir()) == [lock_file(dist).name, "dist"]


def test_recovery_puts_back_a_folder_killed_between_its_two_renames(tmp_path):
    from flexrank.io import recover_interrupted_write

    dist = tmp_path / "dist"
    (tmp_path / ".dist.old").mkdir()
    (tmp_path / ".dist.old" / "model.onnx").write_bytes(b"previous")
    (tmp_path / ".dist.k3j9ab_x.tmp").mkdir()  # the half-built new bundle
    (tmp_path / ".dist.k3j9ab_x.tmp" / "part").write_bytes(b"half")
    (tmp_path / ".dist.json.x1.tmp").write_bytes(b"")  # another name's temporary: not ours
    (tmp_path / ".distant.a.tmp").write_bytes(b"")  # nor this
    removed = recover_interrupted_write(dist)
    assert (dist / "model.onnx").read_bytes() == b"previous"
    assert [p.name for p in removed] == [".dist.k3j9ab_x.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dist.json.x1.tmp", ".distant.a.tmp",
                                                          "dist"]
    # with the new folder in place, a leftover .old is the stale one and goes
    (tmp_path / ".dist.old").mkdir()
    assert [p.name for p in recover_interrupted_write(dist)] == [".dist.old"]
    assert (dist / "model.onnx").read_bytes() == b"previous"
