"""Block-sequential DataSVD with the calibration hidden states on disk (issue 20).

Reference: the same function with the hidden states in memory (itself checked against the
all-at-once path in tests/test_blockwise.py): the files hold the same bytes, so the
factors must be equal bit for bit. Memory is not measured here (BENCHMARKS.md, "Scale
(issue 20)"); instead the loader and writer are instrumented to show that one batch's
hidden states is alive at a time."""

import copy
import errno
import re
import sys
import weakref

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, token_batches
from test_blockwise import deeper

from flexrank.compress import offload
from flexrank.compress.blockwise import factorize_blockwise_
from flexrank.compress.config import FactorizeConfig
from flexrank.compress.select import nested_layers
from flexrank.io import WriteError

NUM_BATCHES, BLOCKS = 3, 3


class Tracker:
    """Wraps offload.save_hidden / load_hidden: counts the calls and, at each, which
    batches' hidden states (written or read earlier) are still alive."""

    def __init__(self, monkeypatch):
        self.saves = self.loads = 0
        self.refs: list[tuple[int, weakref.ref]] = []
        self.alive_elsewhere: list[tuple[str, int, list[int]]] = []
        save, load = offload.save_hidden, offload.load_hidden

        def tracked_save(hidden, path):
            self._check("save", path)
            self.saves += 1
            save(hidden, path)
            self.refs.append((self._batch(path), weakref.ref(hidden)))

        def tracked_load(path, device):
            self._check("load", path)
            self.loads += 1
            hidden = load(path, device)
            self.refs.append((self._batch(path), weakref.ref(hidden)))
            return hidden

        monkeypatch.setattr(offload, "save_hidden", tracked_save)
        monkeypatch.setattr(offload, "load_hidden", tracked_load)

    @staticmethod
    def _batch(path) -> int:
        return int(re.fullmatch(r"batch-(\d+)\.pt", path.name).group(1))

    def _check(self, what: str, path) -> None:
        batch = self._batch(path)
        others = sorted({b for b, ref in self.refs if ref() is not None and b != batch})
        if others:
            self.alive_elsewhere.append((what, batch, others))


def _run(model, batches, config, **kwargs):
    model = copy.deepcopy(model)
    reports = factorize_blockwise_(model, batches, config, precise=True, progress=False,
                                   **kwargs)
    return model, reports


def _assert_same_factors(a_model, a_reports, b_model, b_reports):
    assert [r.name for r in a_reports] == [r.name for r in b_reports]
    for a, b in zip(a_reports, b_reports, strict=True):
        assert torch.equal(a.sigma, b.sigma), a.name
    a_layers, b_layers = nested_layers(a_model), nested_layers(b_model)
    assert list(a_layers) == list(b_layers) and len(a_layers) >= 13
    for name, layer in a_layers.items():
        assert torch.equal(layer.U, b_layers[name].U), name
        assert torch.equal(layer.V, b_layers[name].V), name


@pytest.mark.parametrize("build,include_head", [(tiny_llama, False), (tiny_gpt2, True)])
def test_offloaded_factors_equal_in_memory_factors(build, include_head, tmp_path,
                                                   monkeypatch):
    model = deeper(build, seed=3, blocks=BLOCKS)  # float32: any change of bytes shows
    batches = token_batches(100, num=NUM_BATCHES, batch=4, seq=48, seed=1)
    batches[1]["attention_mask"][0, 40:] = 0  # padding is skipped the same way
    config = FactorizeConfig(include_lm_head=include_head)
    in_memory, ref = _run(model, batches, config)

    tracker = Tracker(monkeypatch)
    on_disk, got = _run(model, batches, config, offload_dir=tmp_path / "hidden")
    _assert_same_factors(in_memory, ref, on_disk, got)
    if include_head:
        assert "lm_head" in {r.name for r in got}  # read back from the last block's files
    # the first block's inputs, each block's outputs but the last's (kept only for a
    # layer outside the blocks), one read per block (+ the last pass over the model)
    passes = BLOCKS + include_head
    assert tracker.saves == tracker.loads == NUM_BATCHES * passes
    assert tracker.alive_elsewhere == [], "hidden states of other batches were held"
    assert list((tmp_path / "hidden").iterdir()) == []  # this run's folder is gone


def test_offload_folder_removed_when_a_block_raises(tmp_path, monkeypatch):
    model = deeper(tiny_llama, seed=3, blocks=BLOCKS)
    batches = token_batches(100, num=NUM_BATCHES, batch=2, seq=16, seed=1)
    folder = tmp_path / "hidden"
    files_when_raised = []

    def fail(module, args):
        files_when_raised.extend(folder.rglob("batch-*.pt"))
        raise RuntimeError("layer failed")
    model.model.layers[1].mlp.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="layer failed"):
        factorize_blockwise_(model, batches, progress=False, offload_dir=folder)
    # the second block's inputs were on disk then, but batch 0's (read, being run)
    assert sorted(p.name for p in files_when_raised) == ["batch-000001.pt", "batch-000002.pt"]
    assert list(folder.iterdir()) == []


def test_offload_refuses_a_disk_without_room(tmp_path, monkeypatch):
    free = 1000  # bytes; one batch of hidden states is 2 x 16 x 64 x 4 bytes = 8 kB
    real = offload.shutil.disk_usage
    monkeypatch.setattr(offload.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=free))
    with pytest.raises(WriteError, match="need ~.* GB and the disk has") as err:
        factorize_blockwise_(deeper(tiny_llama, seed=3), token_batches(
            100, num=2, batch=2, seq=16, seed=1), progress=False, offload_dir=tmp_path)
    assert err.value.errno == errno.ENOSPC and str(tmp_path) in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("available,on_disk", [(10**12, False), (10**3, True)])
def test_auto_offloads_only_what_does_not_fit(available, on_disk, tmp_path, monkeypatch):
    model = deeper(tiny_llama, seed=3)
    batches = token_batches(100, num=2, batch=2, seq=16, seed=1)
    in_memory, ref = _run(model, batches, None)
    monkeypatch.setattr(offload, "available_memory", lambda device: available)
    tracker = Tracker(monkeypatch)
    got_model, got = _run(model, batches, None, offload_dir="auto", auto_dir=tmp_path)
    assert (tracker.saves > 0) == on_disk
    _assert_same_factors(in_memory, ref, got_model, got)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/meminfo")
def test_available_memory_without_psutil_reads_meminfo(monkeypatch):
    psutil = pytest.importorskip("psutil")
    with_psutil = psutil.virtual_memory().available
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil raises ImportError
    from_meminfo = offload.available_memory(torch.device("cpu"))
    # the same kernel figure read twice, moments apart, on a host shared with other jobs
    assert abs(from_meminfo - with_psutil) < 0.2 * with_psutil


def test_compress_offloads_where_told_and_resumes_either_way(tmp_path, monkeypatch):
    """`flexrank compress --offload-hidden DIR`: the decomposed factors equal those of a
    run in memory, bit for bit, DIR is left empty, and the setting is no part of the
    resume signature (where hidden states were kept changes no number)."""
    from conftest import char_tokenizer
    from safetensors.torch import load_file

    from flexrank.cli import main
    from flexrank.compress.config import CompressConfig

    tiny_llama(init_std=0.2).save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("".join(f"{i} the quick brown fox jumps over the lazy dog\n"
                            for i in range(200)))
    args = ["compress", str(tmp_path / "model"), "--calib", str(text), "--samples", "8",
            "--seq-len", "32", "--eval-samples", "0", "--batch-size", "4", "--budgets",
            "1,0.7", "--levels", "4", "--probe-points", "1", "--probe-samples", "2",
            "--steps", "0"]
    assert main([*args, "-o", str(tmp_path / "memory")]) == 0
    tracker = Tracker(monkeypatch)
    assert main([*args, "-o", str(tmp_path / "disk"),
                 "--offload-hidden", str(tmp_path / "hidden")]) == 0
    assert tracker.saves == tracker.loads > 0 and tracker.alive_elsewhere == []
    want = load_file(tmp_path / "memory" / "stages" / "decomposed.safetensors")
    got = load_file(tmp_path / "disk" / "stages" / "decomposed.safetensors")
    assert want.keys() == got.keys() and any(k.endswith(".U") for k in got)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert list((tmp_path / "hidden").iterdir()) == []
    # a finished folder resumes with the other setting: nothing is redone
    decomposed = tmp_path / "memory" / "stages" / "decomposed.safetensors"
    written = decomposed.stat().st_mtime_ns
    assert main([*args, "-o", str(tmp_path / "memory"), "--offload-hidden", "auto"]) == 0
    assert decomposed.stat().st_mtime_ns == written
    assert "offload_hidden" not in CompressConfig(offload_hidden="auto").signature("m")
    with pytest.raises(ValueError, match="offload_hidden '' must be None, 'auto' or"):
        CompressConfig(offload_hidden="")


def test_offload_folder_under_a_file_is_refused_naming_it(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(WriteError, match="cannot write the folder for offloaded hidden "
                                         "states .*file/hidden"):
        factorize_blockwise_(deeper(tiny_llama, seed=3), token_batches(100, num=1),
                             progress=False, offload_dir=tmp_path / "file" / "hidden")
