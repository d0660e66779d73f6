"""dp score / dp prune on a chosen device, in a chosen precision, and shared out over torchrun processes."""

import json

import pytest
import torch
from helpers.latent import kl_autoencoder, latent_unet2d, write_pipeline
from helpers.processes import DIGITS_SCAN, run_dp
from helpers.scan import calibration

from dpcli.errors import BadSetting
from dpcli.jobs.score import ScoreSettings, compute_scores
from dpcli.loading import load_model
from dpcli.plugins import get_registry
from dpcli.runtime import Distributed
from dpcli.scoring import (
    accumulate_gradients,
    calibration_batch,
    calibration_noise,
    default_chunk,
    gradient_checkpointing,
    share_rows,
)
from dpcli.testing import make_image_folder, tiny_loaded

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("command", ["score", "prune"])
def test_help_shows_device_precision_and_checkpointing(dp, command):
    result = dp(command, "--help")
    assert result.exit_code == 0
    for option in ("--device", "--precision", "--gradient-checkpoint"):  # (cut to the column width)
        assert option in result.stdout


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["score", "prune"])
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_one_line_and_exit_2(
    dp, tmp_path, tiny_unet_folder, image_folder, command, device
):
    args = [command, str(tiny_unet_folder), "--data", str(image_folder), "--device", device]
    if command == "prune":
        args += ["--criterion", "diff-taylor", "--ratio", "0.3", "-o", str(tmp_path / "out")]
    result = dp(*args)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"Error: --device {device}: no CUDA GPU is available"]
    assert not (tmp_path / "out").exists()


def test_bad_device_and_precision_are_exit_2(dp, tiny_unet_folder, image_folder):
    base = ["score", str(tiny_unet_folder), "--data", str(image_folder)]
    result = dp(*base, "--device", "tpu")
    assert result.exit_code == 2 and "--device must be auto, cpu, cuda, cuda:N or mps" in result.stderr
    result = dp(*base, "--precision", "fp8")
    assert result.exit_code == 2 and "--precision must be one of fp32, bf16, fp16" in result.stderr
    if not CUDA:
        result = dp(*base, "--device", "cpu", "--precision", "fp16")
        assert result.exit_code == 2 and "fp16 needs a CUDA GPU" in result.stderr


class Reached(Exception):
    """Raised by the spy at the first forward of the scan, once it has seen where everything is."""


def test_the_model_calibration_batch_and_scan_live_on_the_chosen_device(tmp_path, monkeypatch):
    """torch's ``meta`` device stands in for a GPU: whatever is left behind on the CPU shows."""
    pipeline = write_pipeline(tmp_path / "class-ldm", latent_unet2d(4, num_class_embeds=3), kl_autoencoder())
    images = make_image_folder(tmp_path / "images", count=4, size=20)
    loaded = load_model(str(pipeline))
    adapter = loaded.adapter
    seen = {}

    def spy_encode(module, inputs):
        seen["autoencoder"], seen["images"] = next(module.parameters()).device, inputs[0].device

    def spy_predict(loaded, sample, timesteps, conditioning=None):
        seen["model"] = next(loaded.model.parameters()).device
        seen["sample"], seen["timesteps"] = sample.device, timesteps.device
        seen["conditioning"] = {key: value.device for key, value in conditioning.items()}
        raise Reached

    loaded.components["vae"].encoder.register_forward_pre_hook(spy_encode)
    monkeypatch.setattr(adapter, "predict", spy_predict)
    settings = ScoreSettings("diff-taylor", data=str(images), calib_size=4, timesteps=4)
    with pytest.raises(Reached):
        compute_scores(loaded, settings, dist=Distributed(device=torch.device("meta")))
    meta = torch.device("meta")
    assert seen["autoencoder"] == seen["images"] == meta  # the calibration images are encoded there
    assert seen["model"] == seen["sample"] == seen["timesteps"] == meta
    assert seen["conditioning"] == {"class_labels": meta}


def test_default_chunk_depends_on_the_device():
    assert default_chunk(32, 256, "cpu") == 2  # 64 samples per pass: measured on the CPU
    assert default_chunk(32, 256, "cuda") == 8  # 256 per pass on a GPU (not measured here)
    assert default_chunk(32, 128, "cuda") == 4  # --batch-size still caps a pass
    assert default_chunk(32, 256, "mps") == 2


def test_bf16_runs_the_forward_under_autocast_and_keeps_float32_gradients(monkeypatch):
    x0, noise = calibration()
    exact = tiny_loaded()
    adapter = get_registry().adapter("ddpm")
    reference = accumulate_gradients(exact, adapter, x0, noise, 0.0, timesteps=6, chunk=3)
    autocast_seen = []
    predict = adapter.predict

    def spy(loaded, sample, timesteps, conditioning=None):
        autocast_seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return predict(loaded, sample, timesteps, conditioning)

    monkeypatch.setattr(adapter, "predict", spy)
    low = tiny_loaded()
    scan = accumulate_gradients(low, adapter, x0, noise, 0.0, timesteps=6, chunk=3, precision="bf16")
    assert autocast_seen == [(True, torch.bfloat16)] * 2
    # bf16 keeps 8 bits of mantissa: losses agree to about 1 %, gradients point the same way
    assert scan.losses == pytest.approx(reference.losses, rel=2e-2)
    low_grads = torch.cat([p.grad.flatten() for p in low.model.parameters()])
    exact_grads = torch.cat([p.grad.flatten() for p in exact.model.parameters()])
    assert all(p.grad.dtype == torch.float32 for p in low.model.parameters())
    assert torch.nn.functional.cosine_similarity(low_grads, exact_grads, dim=0) > 0.99


def test_gradient_checkpointing_gives_the_same_gradients_and_is_off_afterwards(monkeypatch):
    x0, noise = calibration()
    adapter = get_registry().adapter("ddpm")
    plain = tiny_loaded()
    accumulate_gradients(plain, adapter, x0, noise, 0.0, timesteps=4, chunk=2)
    checkpointed = tiny_loaded()
    during = []
    predict = adapter.predict

    def spy(loaded, sample, timesteps, conditioning=None):
        during.append(loaded.model.is_gradient_checkpointing)
        return predict(loaded, sample, timesteps, conditioning)

    monkeypatch.setattr(adapter, "predict", spy)
    with gradient_checkpointing(checkpointed.model, True):
        accumulate_gradients(checkpointed, adapter, x0, noise, 0.0, timesteps=4, chunk=2)
    assert during == [True, True] and not checkpointed.model.is_gradient_checkpointing
    for (name, a), b in zip(plain.model.named_parameters(), checkpointed.model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    with pytest.raises(BadSetting, match="does not support gradient checkpointing"):
        with gradient_checkpointing(torch.nn.Linear(2, 2), True):
            pass


@pytest.mark.slow
def test_prune_with_gradient_checkpointing_prunes_like_without(dp, tmp_path, tiny_unet_folder, image_folder):
    kept = []
    for name, extra in (("plain", []), ("checkpointed", ["--gradient-checkpointing"])):
        out = tmp_path / name
        args = ["prune", str(tiny_unet_folder), "--data", str(image_folder), "--criterion", "diff-taylor"]
        result = dp(*args, "--ratio", "0.3", "--calib-size", "4", "--timesteps", "6", "-o", str(out), *extra)
        assert result.exit_code == 0, result.stderr
        kept.append(json.loads((out / "dpcli.json").read_text())["pruning"]["kept_channels"])
    assert kept[0] == kept[1] and kept[0]


def test_each_process_prepares_only_its_share_and_the_shares_make_the_batch(image_folder, monkeypatch):
    loaded = tiny_loaded()
    adapter = get_registry().adapter("ddpm")
    prepared = []
    prepare = adapter.prepare_batch

    def spy(loaded, images, context):
        prepared.append(images.shape[0])
        return prepare(loaded, images, context)

    monkeypatch.setattr(adapter, "prepare_batch", spy)
    whole, _ = calibration_batch(loaded, adapter, str(image_folder), 7, seed=3)
    whole_noise = calibration_noise(whole, 3)
    shares, noises = [], []
    for rank in range(3):
        rows = share_rows(7, rank, 3)
        x0, _ = calibration_batch(loaded, adapter, str(image_folder), 7, seed=3, rows=rows)
        shares.append(x0)
        noises.append(calibration_noise(x0, 3, rows, total=7))
    assert prepared == [7, 2, 2, 3]
    assert torch.equal(torch.cat(shares), whole) and torch.equal(torch.cat(noises), whole_noise)
    with pytest.raises(BadSetting, match="smaller than the number of processes"):
        share_rows(2, 0, 3)


# Two gloo processes against one ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "scan",
    [["--calib-size", "5", "--timestep-stride", "2"], ["--scan-budget", "100"]],
    ids=["odd-calib-strided", "scan-budget"],
)
def test_two_gloo_processes_score_like_one(tmp_path, scan):
    from safetensors.torch import load_file

    one = run_dp(["score", *DIGITS_SCAN, *scan, "-o", str(tmp_path / "one.safetensors")], processes=1)
    two = run_dp(["score", *DIGITS_SCAN, *scan, "-o", str(tmp_path / "two.safetensors")], processes=2)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["cutoff"] == one["cutoff"] < 29 and two["scan_budget"] == one["scan_budget"]
    assert (two["calib_size"], two["timestep_stride"]) == (one["calib_size"], one["timestep_stride"])
    # (the default --chunk packs for the share one process holds, so the work past the cutoff may differ)
    # The same sums of float32 terms in another order (each process adds its images, then the two halves
    # are added): rounding of ~1e-7 relative per addition, so 1e-5 leaves a wide margin.
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    ratio = [loss / max(one["losses"][: i + 1]) for i, loss in enumerate(one["losses"])]
    assert ratio[-1] < 0.4 - 1e-3 and all(r > 0.4 + 1e-3 for r in ratio[:-1])  # no near-tie at the cutoff
    single, shared = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert single.keys() == shared.keys()
    for key in single:
        # Σ|w·g| per channel: relative to the group's largest score, as a channel whose score is 0 in exact
        # arithmetic is only rounding noise in both.
        torch.testing.assert_close(
            shared[key], single[key], rtol=1e-4, atol=1e-5 * single[key].abs().max().item()
        )


@pytest.mark.slow
def test_two_gloo_processes_prune_like_one(tmp_path):
    kept = []
    for processes in (1, 2):
        out = tmp_path / f"pruned-{processes}"
        args = [
            "prune",
            *DIGITS_SCAN,
            "--calib-size",
            "5",
            "--criterion",
            "diff-taylor",
            "--ratio",
            "0.3",
            "-o",
            str(out),
        ]
        report = run_dp(args, processes)
        assert report["output"] == str(out)
        kept.append(json.loads((out / "dpcli.json").read_text())["pruning"]["kept_channels"])
    assert kept[0] == kept[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned-1", "pruned-2"]  # nothing half-written


# On a CUDA GPU (skipped where there is none) ---------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_the_scan_on_cuda_matches_the_cpu(precision):
    x0, noise = calibration()
    adapter = get_registry().adapter("ddpm")
    on_cpu = tiny_loaded()
    reference = accumulate_gradients(on_cpu, adapter, x0, noise, 0.0, timesteps=8, chunk=4)
    on_gpu = tiny_loaded()
    on_gpu.model.to("cuda")
    device = torch.device("cuda")
    scan = accumulate_gradients(
        on_gpu, adapter, x0.to(device), noise.to(device), 0.0, timesteps=8, chunk=4, precision=precision
    )
    assert scan.device.startswith("cuda") and scan.cutoff == reference.cutoff
    # cuDNN/TF32 kernels round differently; 16-bit autocast keeps 8 (bf16) or 11 (fp16) mantissa bits
    tolerance = {"fp32": 1e-3, "bf16": 2e-2, "fp16": 5e-3}[precision]
    assert scan.losses == pytest.approx(reference.losses, rel=tolerance)
    gpu_grads = torch.cat([p.grad.flatten().cpu() for p in on_gpu.model.parameters()])
    cpu_grads = torch.cat([p.grad.flatten() for p in on_cpu.model.parameters()])
    assert all(p.grad.dtype == torch.float32 for p in on_gpu.model.parameters())
    assert torch.nn.functional.cosine_similarity(gpu_grads, cpu_grads, dim=0) > 0.99


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_prune_on_cuda_writes_a_model_that_loads(dp, tmp_path, tiny_unet_folder, image_folder):
    out = tmp_path / "pruned"
    args = ["prune", str(tiny_unet_folder), "--data", str(image_folder), "--criterion", "diff-taylor"]
    result = dp(
        *args,
        "--target-macs",
        "0.6",
        "--tolerance",
        "0.3",
        "--calib-size",
        "4",
        "--timesteps",
        "6",
        "--device",
        "cuda",
        "--json",
        "-o",
        str(out),
    )
    assert result.exit_code == 0, result.stderr
    assert load_model(str(out)).model is not None
