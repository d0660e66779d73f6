"""dp export: the UNet as ONNX (dynamic batch, timestep and conditioning inputs) or TorchScript, verified."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpcli.testing import save_tiny_unet

onnxruntime = pytest.importorskip("onnxruntime")


def run_onnx(path, feeds: dict) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {name: value.numpy() for name, value in feeds.items()})[0]


def test_onnx_export_runs_in_onnxruntime_at_any_batch_like_the_pytorch_unet(dp, tmp_path):
    from dpcli.testing import make_unet

    model = save_tiny_unet(tmp_path / "unet")
    result = dp("export", model, "-o", tmp_path / "unet.onnx", "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json
    assert [item["name"] for item in report["inputs"]] == ["sample", "timestep"]
    assert report["inputs"][0]["shape"] == ["batch", 3, 16, 16] and report["opset"] == 17
    assert report["max_abs_diff"] <= 1e-3 and report["files"] == [str(tmp_path / "unet.onnx")]

    unet = make_unet()
    generator = torch.Generator().manual_seed(5)
    sample, timestep = torch.randn(5, 3, 16, 16, generator=generator), torch.tensor([0, 10, 200, 500, 999])
    with torch.no_grad():
        expected = unet(sample, timestep).sample.numpy()
    got = run_onnx(tmp_path / "unet.onnx", {"sample": sample, "timestep": timestep})
    assert got.shape == (5, 3, 16, 16) and np.abs(got - expected).max() < 1e-4

    table = dp("export", model, "-o", tmp_path / "again.onnx", "--opset", "14")
    assert table.exit_code == 0, table.stderr
    assert "max abs difference" in table.stdout and "batch × 3 × 16 × 16" in table.stdout


@pytest.mark.slow
def test_a_pruned_text_unet_exports_with_its_text_conditioning_input(tmp_path):
    from helpers.latent import write_text_pipeline

    import dpcli

    folder = write_text_pipeline(tmp_path / "sd", tmp_path / "tokenizer-files")
    model = dpcli.prune(dpcli.load(folder), criterion="magnitude", ratio=0.3, head_ratio=0.25)
    report = model.export(tmp_path / "sd-unet.onnx")
    names = [item["name"] for item in report.inputs]
    assert names == ["sample", "timestep", "encoder_hidden_states"]
    assert report.inputs[2]["shape"] == ["batch", 8, 64]

    generator = torch.Generator().manual_seed(1)
    feeds = {
        "sample": torch.randn(4, 4, 8, 8, generator=generator),
        "timestep": torch.tensor([1, 250, 500, 999]),
        "encoder_hidden_states": torch.randn(4, 8, 64, generator=generator),
    }
    with torch.no_grad():
        expected = model.module(*feeds.values()).sample.numpy()
    assert np.abs(run_onnx(tmp_path / "sd-unet.onnx", feeds) - expected).max() < 1e-4


def test_torchscript_export_reloads_and_matches(dp, tmp_path):
    model = save_tiny_unet(tmp_path / "unet")
    result = dp("export", model, "--format", "torchscript", "-o", tmp_path / "unet.pt", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json["format"] == "torchscript" and result.json["opset"] is None
    traced = torch.jit.load(str(tmp_path / "unet.pt"))
    sample, timestep = torch.randn(3, 3, 16, 16), torch.tensor([3, 30, 300])
    from dpcli.testing import make_unet

    with torch.no_grad():
        assert torch.allclose(traced(sample, timestep), make_unet()(sample, timestep).sample, atol=1e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        (("--format", "tflite"), "--format must be one of onnx, torchscript"),
        (("--opset", "11"), "--opset must be in [14, "),
        (("--tolerance", "0"), "--tolerance must be positive"),
    ],
)
def test_bad_export_settings_exit_2_before_loading(dp, tmp_path, options, message):
    result = dp("export", tmp_path / "missing-model", "-o", tmp_path / "x.onnx", *options)
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_bad_model_or_existing_output_exit_2(dp, tmp_path):
    missing = dp("export", tmp_path / "missing-model", "-o", tmp_path / "x.onnx")
    assert missing.exit_code == 2 and "model not found" in missing.stderr
    model = save_tiny_unet(tmp_path / "unet")
    (tmp_path / "taken.onnx").write_text("keep me")
    taken = dp("export", model, "-o", tmp_path / "taken.onnx")
    assert taken.exit_code == 2 and "use --force" in taken.stderr
    assert (tmp_path / "taken.onnx").read_text() == "keep me"


def test_an_export_outside_the_tolerance_fails_and_writes_nothing(dp, tmp_path):
    model = save_tiny_unet(tmp_path / "unet")
    result = dp("export", model, "-o", tmp_path / "unet.onnx", "--tolerance", "1e-12")
    assert result.exit_code == 1
    assert "differs from PyTorch by up to" in result.stderr and "not written" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]


def test_tensors_written_as_external_data_end_up_in_one_data_file(tmp_path):
    import onnx

    from dpcli.jobs.export import consolidate_external_data

    save_tiny_unet(tmp_path / "unet")
    import dpcli

    dpcli.export(dpcli.load(tmp_path / "unet"), tmp_path / "plain.onnx")
    scattered = tmp_path / "scattered"
    scattered.mkdir()
    proto = onnx.load(str(tmp_path / "plain.onnx"))
    # what torch's exporter does for a model over 2 GB: one file per tensor beside the model
    onnx.save_model(
        proto,
        str(scattered / "m.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=0,
    )
    assert len(list(scattered.iterdir())) > 10
    final = consolidate_external_data(scattered / "m.onnx", tmp_path / "final" / "m.onnx")
    assert sorted(p.name for p in final.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    feeds = {"sample": torch.randn(2, 3, 16, 16), "timestep": torch.tensor([4, 400])}
    assert np.array_equal(run_onnx(final, feeds), run_onnx(tmp_path / "plain.onnx", feeds))
