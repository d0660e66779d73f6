"""`dp eval`: consistency to a reference from the same noise, FID that means something, reports, bad input,
and torchrun sampling identical to one process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dpcli.metrics import DIGITS, PSNR_IDENTICAL, FidComputer, data_as_uint8, load_stats
from dpcli.testing import TINY_UNET_CONFIG, make_image_folder, make_unet

FAST = ["--steps", "3", "--num-samples", "4", "--batch-size", "4", "--no-latency"]
REPORT_KEYS = {
    "format",
    "dpcli_version",
    "model",
    "adapter",
    "params",
    "macs",
    "blocks",
    "image_shape",
    "sampling",
    "latency",
    "fid",
    "fid_info",
    "clip_score",
    "clip_info",
    "protocol",
    "reference",
    "ssim",
    "psnr",
    "stats_file",
    "output",
    "files",
    "grid",
    "bad_samples",
}
SAMPLING_KEYS = {
    "sampler",
    "steps",
    "spacing",
    "timesteps",
    "model_evaluations",
    "seed",
    "guidance_scale",
    "conditions_sha256",
    "num_samples",
    "batch_size",
    "device",
    "precision",
    "world_size",
    "seconds",
    "images_per_second",
}


@pytest.fixture
def digits_unet_folder(tmp_path):
    folder = tmp_path / "digits-unet"
    make_unet({**TINY_UNET_CONFIG, "in_channels": 1, "out_channels": 1}).save_pretrained(folder)
    return folder


def test_a_model_is_perfectly_consistent_with_itself(dp, tmp_path, tiny_unet_folder):
    out = tmp_path / "eval"
    result = dp("eval", tiny_unet_folder, "--reference", tiny_unet_folder, *FAST, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json
    assert set(report) == REPORT_KEYS and set(report["sampling"]) == SAMPLING_KEYS
    assert report["ssim"] == pytest.approx(1.0) and report["psnr"] == PSNR_IDENTICAL
    assert report["fid"] is None and "--data" in report["fid_info"]["unavailable"]
    assert report["image_shape"] == [3, 16, 16] and report["sampling"]["model_evaluations"] == 3
    assert json.loads((out / "report.json").read_text()) == report
    assert {p.name for p in out.iterdir()} == {"report.json", "grid.png", "samples.safetensors"}
    from safetensors.torch import load_file

    samples = load_file(out / "samples.safetensors")
    assert samples["images"].dtype == torch.uint8 and samples["images"].shape == (4, 3, 16, 16)
    assert samples["indices"].tolist() == [0, 1, 2, 3]


def test_a_pruned_model_drifts_from_its_original(dp, tiny_unet_folder, pruned_folder):
    result = dp("eval", pruned_folder, "--reference", tiny_unet_folder, *FAST, "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json
    assert report["ssim"] < 0.999 and report["psnr"] < PSNR_IDENTICAL
    assert report["macs"] < report["reference"]["macs"] and report["params"] < report["reference"]["params"]
    conv_in = next(block for block in report["blocks"] if block["name"] == "conv_in")
    assert conv_in["original"] == 32 and conv_in["width"] < 32


def test_latency_is_reported_per_step_at_two_batch_sizes(dp, tiny_unet_folder, capsys):
    fast = [a for a in FAST if a != "--no-latency"]
    result = dp("eval", tiny_unet_folder, *fast, "--latency-batch", "2", "--repeats", "1", "--json")
    assert result.exit_code == 0, result.stderr
    latency = result.json["latency"]
    assert latency["batch"] == 2 and latency["repeats"] == 1 and latency["warmup"] == 2
    assert latency["batch_1_ms"] > 0 and latency["batch_ms"] > 0
    assert result.json["sampling"]["images_per_second"] > 0
    from dpcli.cli.render.eval import render_eval

    render_eval(result.json)
    table = capsys.readouterr().out
    assert "per step at batch 1" in table and "at batch 2" in table and "images/s" in table


def test_digits_fid_is_zero_for_a_set_and_grows_with_noise():
    from dpcli.data import load_images

    images = data_as_uint8(load_images("builtin:digits", size=16, channels=1, limit=400))
    generator = torch.Generator().manual_seed(0)
    values = []
    for noise in (0.0, 0.1, 0.3):
        noisy = images.float() + noise * 255 * torch.randn(images.shape, generator=generator)
        fid = FidComputer(DIGITS)
        fid.update(images, real=True)
        fid.update(noisy.round().clamp(0, 255).to(torch.uint8), real=False)
        values.append(fid.compute())
    assert values[0] < 1e-3
    assert values[0] < values[1] < values[2]


def test_fid_against_digits_and_saved_statistics(dp, tmp_path, digits_unet_folder):
    stats = tmp_path / "digits-stats.safetensors"
    first = dp("eval", digits_unet_folder, *FAST, "--data", "builtin:digits", "--save-stats", stats, "--json")
    assert first.exit_code == 0, first.stderr
    report = first.json
    assert report["fid"] > 0 and report["fid_info"]["extractor"] == DIGITS
    assert report["fid_info"]["reference_count"] == 1797 and report["fid_info"]["samples"] == 4
    saved = load_stats(stats)
    assert saved.features == 64 and saved.count == 1797 and saved.sigma.shape == (64, 64)
    again = dp("eval", digits_unet_folder, *FAST, "--fid-stats", stats, "--json")
    assert again.exit_code == 0, again.stderr
    assert again.json["fid"] == pytest.approx(report["fid"], rel=1e-6)


def fake_inception_weights(path, monkeypatch):
    """Randomly initialised weights of torch-fidelity's Inception-v3 (the real ones are not downloadable here)."""
    from torch_fidelity import feature_extractor_inceptionv3 as module

    with monkeypatch.context() as patch:
        patch.setattr(module, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        network = module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(network.state_dict(), path)
    return path


@pytest.mark.slow
def test_fid_with_local_inception_weights(dp, tmp_path, tiny_unet_folder, monkeypatch):
    weights = fake_inception_weights(tmp_path / "inception.pth", monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    images = make_image_folder(tmp_path / "three-images", count=3)
    fast = ["--steps", "2", "--num-samples", "2", "--no-latency", "--json"]
    result = dp("eval", tiny_unet_folder, *fast, "--data", images, "--inception-weights", weights)
    assert result.exit_code == 0, result.stderr
    info = result.json["fid_info"]
    assert info["extractor"] == "inception-v3" and info["features"] == 2048 and info["reference_count"] == 3
    assert result.json["fid"] >= 0


def test_bad_input_exits_2_before_any_sampling(
    dp, tmp_path, tiny_unet_folder, digits_unet_folder, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    small = tmp_path / "small"
    make_unet({**TINY_UNET_CONFIG, "sample_size": 8}).save_pretrained(small)
    from dpcli.metrics import FidStats, save_stats

    wrong_stats = tmp_path / "wrong.safetensors"
    save_stats(FidStats(torch.zeros(32).double(), torch.eye(32).double(), 10, DIGITS), wrong_stats)
    pytorch_fid_stats = tmp_path / "pytorch-fid.npz"  # mu/sigma files of other tools hold Inception features
    np.savez(pytorch_fid_stats, mu=np.zeros(64), sigma=np.eye(64))
    cases = [
        (["--reference", digits_unet_folder], "different sample size or channel count"),
        (["--reference", small], "different sample size or channel count"),
        (["--data", "builtin:digits", "--num-samples", "1"], "at least 2 samples"),
        (["--fid-stats", wrong_stats], "32 features"),
        (["--fid-stats", pytorch_fid_stats], "64 features; inception-v3 gives 2048"),
        (["--data", make_image_folder(tmp_path / "images", count=2)], "Inception-v3 weights"),
        (["--data", tmp_path / "no-such-folder"], "data not found"),
        (["--data", tiny_unet_folder], "no images in"),
        (["--data", "builtin:digits", "--inception-weights", tmp_path / "nope.pth"], "file not found"),
        (["--data", "builtin:digits", "--fid-stats", wrong_stats], "not both"),
        (["--save-stats", tmp_path / "s.safetensors"], "pass --data too"),
        (["--spacing", "cubic"], "--spacing must be one of"),
        (["--steps", "5000"], "--steps must be in [1, 1000]"),
    ]
    for args, message in cases:
        result = dp("eval", tiny_unet_folder, "--steps", "2", "--no-latency", *args, "-o", tmp_path / "out")
        assert result.exit_code == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
        assert "Sampling" not in result.stderr, args
    assert not (tmp_path / "out").exists()


def run_python(args, env, cwd):
    environment = {**os.environ, **env, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=environment, cwd=cwd)


@pytest.mark.slow
def test_torchrun_gives_the_images_of_a_single_process(tmp_path, tiny_unet_folder):
    from safetensors.torch import load_file

    common = ["eval", str(tiny_unet_folder), "--steps", "2", "--num-samples", "5", "--batch-size", "2"]
    common += ["--no-latency", "--json"]
    single = run_python(["-m", "dpcli", *common, "-o", str(tmp_path / "one")], {}, tmp_path)
    assert single.returncode == 0, single.stderr
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    double = run_python([*launcher, "-m", "dpcli", *common, "-o", str(tmp_path / "two")], {}, tmp_path)
    assert double.returncode == 0, double.stderr
    report = json.loads(double.stdout)  # rank 1 prints nothing
    assert report["sampling"]["world_size"] == 2 and report["sampling"]["num_samples"] == 5
    one = load_file(tmp_path / "one" / "samples.safetensors")
    two = load_file(tmp_path / "two" / "samples.safetensors")
    assert torch.equal(one["images"], two["images"]) and torch.equal(one["indices"], two["indices"])
