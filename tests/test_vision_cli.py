"""Vision models through the command line as a new user runs them (issue 19): a tiny random
ViTForImageClassification saved with save_pretrained (with its image processor) and a
folder of PNG files of several sizes; `flexrank compress MODEL --calib FOLDER`, then
`flexrank-export` of its checkpoint and of the plain model folder with --calib. The
calibration tensors are the image processor's own pixel values (transformers reads the
images, not us), and every exported graph's logits equal PyTorch's on new images
(onnxruntime against the checkpoint's model at that budget)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flexrank.cli import export_main, main
from flexrank.compress.elastic import ElasticModel
from flexrank.manifest import MANIFEST_FILE
from flexrank.runtime.kv_cache import make_session


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    """(model folder, image folder, the model, its processor, the PNG arrays)."""
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    root = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, num_labels=5,
        initializer_range=0.2)).eval()
    model.save_pretrained(root / "model")
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    processor.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    pictures = []
    for i in range(40):  # sizes differ: the processor resizes each to 16 × 16
        picture = rng.integers(0, 256, (12 + i % 3 * 6, 20 + i % 2 * 4, 3), dtype=np.uint8)
        Image.fromarray(picture).save(root / "images" / f"{i:02d}.png")
        pictures.append(picture)
    return root / "model", root / "images", model, processor, pictures


def logits_match(bundle, elastic, pixels: torch.Tensor) -> dict[float, float]:
    """Per exported budget: max |onnxruntime − PyTorch| of the logits on `pixels`."""
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    worst = {}
    for entry in manifest["budgets"]:
        session = make_session(bundle / entry["graph"])
        assert [o.name for o in session.get_outputs()] == ["logits"]
        ours = session.run(["logits"], {"pixel_values": pixels.numpy()})[0]
        elastic.set_budget(entry["beta"])
        with torch.no_grad():
            reference = elastic.model(pixel_values=pixels).logits.numpy()
        assert ours.shape == reference.shape == (len(pixels), 5)
        worst[entry["beta"]] = float(np.abs(ours - reference).max())
    return worst


@pytest.fixture(scope="module")
def compressed(vit_folder, tmp_path_factory):
    """`flexrank compress` of the ViT folder on its images: the output folder."""
    model_dir, images, *_ = vit_folder
    out = tmp_path_factory.mktemp("compressed") / "out"
    code = main(["compress", str(model_dir), "-o", str(out), "--calib", str(images),
                 "--samples", "16", "--eval-samples", "4", "--batch-size", "8",
                 "--budgets", "1,0.5", "--levels", "4", "--probe-samples", "4",
                 "--steps", "2", "--train-batch", "4"])
    assert code == 0
    return out


def test_vit_folder_compresses_and_exports_from_the_command_line(vit_folder, compressed,
                                                                 tmp_path):
    _, _, _, processor, pictures = vit_folder
    out = compressed
    # the calibration samples are the processor's pixel values of 20 of the 40 images
    data = load_file(str(out / "stages" / "calibration.safetensors"))
    assert data["train"].shape == (16, 3, 16, 16) and data["eval"].shape == (4, 3, 16, 16)
    expected = processor(images=[p for p in pictures], return_tensors="pt")["pixel_values"]
    for row in torch.cat([data["train"], data["eval"]]):
        distance = (expected - row).abs().flatten(1).max(1).values
        assert float(distance.min()) < 1e-6
    elastic = ElasticModel.from_pretrained(out / "elastic")
    assert elastic.budgets == [0.5, 1.0]

    bundle = tmp_path / "bundle"
    assert export_main([str(out), "--budget", "all", "-o", str(bundle)]) == 0
    new = torch.from_numpy(np.random.default_rng(5).random((3, 3, 16, 16), np.float32) * 4 - 2)
    worst = logits_match(bundle, elastic, new)
    assert set(worst) == {0.5, 1.0} and max(worst.values()) < 1e-4, worst


def test_flexrank_export_compresses_a_vit_folder_with_calib(vit_folder, tmp_path, capsys):
    model_dir, images, *_ = vit_folder
    bundle, work = tmp_path / "bundle", tmp_path / "work"
    assert export_main([str(model_dir), "--calib", str(images), "--budgets", "1,0.6",
                        "--steps", "1", "--budget", "0.6", "-o", str(bundle),
                        "--work-dir", str(work)]) == 0
    elastic = ElasticModel.from_pretrained(work / "elastic")
    new = torch.from_numpy(np.random.default_rng(6).random((2, 3, 16, 16), np.float32))
    worst = logits_match(bundle, elastic, new)
    assert set(worst) == {0.6} and worst[0.6] < 1e-4, worst


def test_intermediate_matching_of_a_positional_model_is_refused_before_any_work(
        vit_folder, tmp_path, capsys):
    model_dir, images, *_ = vit_folder
    out = tmp_path / "out"
    code = main(["compress", str(model_dir), "-o", str(out), "--calib", str(images),
                 "--samples", "16", "--eval-samples", "4", "--steps", "2",
                 "--intermediate-weight", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "intermediate_weight 1.0 needs a model called by keyword" in err, err
    assert "ViTForImageClassification takes its inputs positionally" in err
    assert (out / "stages" / "calibration.safetensors").exists()  # read, then refused
    assert not (out / "stages" / "decomposed.safetensors").exists()


def test_vision_model_refuses_teacher_calibration(vit_folder, tmp_path, capsys):
    model_dir, *_ = vit_folder
    code = main(["compress", str(model_dir), "-o", str(tmp_path / "out"), "--steps", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "ViTForImageClassification does not read text" in err and "--calib" in err


def test_bench_table_of_a_classifier_shows_measured_ms_per_inference(compressed, tmp_path,
                                                                     monkeypatch, capsys):
    """Encoders' targets are latency per inference (DESIGN.md §6): the decision and the
    bench table show ms per inference, and the host figure is the timing of real
    onnxruntime inferences: under a clock that only advances when an inference has run
    (the k-th by k ms), the table shows exactly the median and p90 of the timed ones."""
    import flexrank.runtime.session as session_module

    bundle = tmp_path / "bundle"
    # β 1 by hand: --budget auto ranks by the top-1 agreement measured on the 4 held-out
    # images, where β 0.5 int8 ties β 1 (test_quality_kinds tests that choice)
    assert export_main([str(compressed), "--profile", "laptop-x86", "--budget", "1", "-o",
                        str(bundle)]) == 0
    decision = capsys.readouterr().out
    assert "ms/inference" in decision and "tok/s" not in decision.split("Chosen:")[0]
    clock = {"now": 0.0, "runs": 0, "shapes": []}
    real_encode = session_module.ElasticSession.encode

    def encode(self, inputs):
        out = real_encode(self, inputs)  # onnxruntime runs the graph
        clock["shapes"].append(out["logits"].shape)
        clock["runs"] += 1
        clock["now"] += clock["runs"] / 1e3  # the k-th inference "takes" k ms
        return out

    monkeypatch.setattr(session_module.ElasticSession, "encode", encode)
    monkeypatch.setattr(session_module, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))
    assert main(["bench", str(bundle), "--profiles", "laptop-x86", "--tokens", "5"]) == 0
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.lstrip().startswith("profile"))
    for column in ("host ms/inference med", "host ms/inference p90", "pred. ms/inference",
                   "target ms/inference"):
        assert column in header
    assert "ms/tok" not in header and "TTFT" not in header
    # one warm-up (1 ms) and 5 timed inferences of 2-6 ms: median 4, p90 5.6 (numpy)
    assert clock["runs"] == 6 and set(clock["shapes"]) == {(1, 5)}
    row = next(line.split() for line in table.splitlines()
               if line.split()[:3] == ["laptop-x86", "laptop", "1"])
    cells = dict(zip(header.split("  "), row, strict=False))
    assert row[6:8] == ["4.00", f"{np.percentile([2, 3, 4, 5, 6], 90):.2f}"], (cells, row)
    assert row[10] == "100"  # the profile's targets.encoder_latency_ms
    report = json.loads((bundle / "bench" / "bench.json").read_text())
    measured = report["tiers"][0]["rows"][0]["measured"]
    assert measured["inferences"] == 5 and measured["latency_ms"] == pytest.approx(4.0)
    assert measured["input"] == "pixel_values (1, 3, 16, 16)"


def test_resnet_folder_with_npy_calibration_exports_from_the_command_line(tmp_path):
    """A torchvision-style CNN the command line can name: transformers' ResNet saved with
    save_pretrained (no input embeddings: get_input_embeddings raises; a 3×3 conv and a
    1×1 shortcut read one tensor as patches of different sizes; no config.image_size),
    calibrated on a folder of .npy samples, in a real flexrank-export process (its terminal
    free of onnxruntime's optimizer notes); its logits in onnxruntime equal PyTorch's on
    inputs of another size."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    ResNetForImageClassification(ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
        layer_type="basic", num_labels=5)).eval().save_pretrained(tmp_path / "resnet")
    (tmp_path / "npy").mkdir()
    samples = np.random.default_rng(1).standard_normal((40, 3, 20, 20)).astype(np.float32)
    for i, sample in enumerate(samples):
        np.save(tmp_path / "npy" / f"{i:02d}.npy", sample)
    bundle, work = tmp_path / "bundle", tmp_path / "work"
    code = "import sys; from flexrank.cli import export_main; sys.exit(export_main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "resnet"), "--calib",
                           str(tmp_path / "npy"), "--budgets", "1,0.6", "--steps", "1",
                           "--budget", "all", "-o", str(bundle), "--work-dir", str(work)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # onnxruntime's optimizer notes about its gpt2 defaults are not the user's (-v shows them)
    assert "num_heads and hidden_size" not in done.stderr, done.stderr[-3000:]
    calibration = load_file(str(work / "stages" / "calibration.safetensors"))["train"]
    rows = [int(np.argmin(np.abs(samples - r.numpy()).reshape(40, -1).max(1)))
            for r in calibration]
    np.testing.assert_array_equal(calibration.numpy(), samples[rows])  # the files, as saved
    elastic = ElasticModel.from_pretrained(work / "elastic")
    assert any(name.endswith("shortcut.convolution") for name in elastic.layer_ranks(0.6))
    new = torch.from_numpy(np.random.default_rng(7).standard_normal((2, 3, 28, 28),
                                                                    ).astype(np.float32))
    worst = logits_match(bundle, elastic, new)
    assert set(worst) == {0.6, 1.0} and max(worst.values()) < 1e-4, worst
