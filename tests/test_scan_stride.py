"""The strided timestep scan (--timestep-stride) and the scan budget (--scan-budget)."""

import json

import pytest
import torch
from helpers.scan import calibration

from dpcli.errors import BadSetting
from dpcli.jobs.scan_budget import BUDGET_MAX_CALIB, BUDGET_MIN_CALIB, plan_scan
from dpcli.plugins import get_registry
from dpcli.scoring import accumulate_gradients
from dpcli.testing import tiny_loaded


def strided_reference(model, scheduler, clean_images, noise, threshold, total, stride):
    """The authors' loop over t = 0, stride, 2·stride, ... only; gradients summed, then scaled by stride."""
    model.eval()
    model.zero_grad()
    loss_max = 0
    losses, scanned = [], []
    for step_k in range(0, total, stride):
        timesteps = (step_k * torch.ones((clean_images.shape[0],))).long()
        noisy_images = scheduler.add_noise(clean_images, noise, timesteps)
        loss = torch.nn.functional.mse_loss(model(noisy_images, timesteps).sample, noise)
        loss.backward()
        losses.append(loss.item())
        scanned.append(step_k)
        loss_max = max(loss_max, loss.item())
        if loss.item() < loss_max * threshold:
            break
    return scanned, losses, {n: p.grad.clone() * stride for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "threshold, stride, chunk, batch_size",
    [(0.0, 5, 3, 256), (0.999, 3, 4, 256), (0.999, 4, 1, 256), (0.999, 3, 8, 4)],
    ids=["all-steps", "early-packed", "early-chunk1", "micro-batched"],
)
def test_strided_scan_is_the_reference_loop_on_every_kth_timestep(threshold, stride, chunk, batch_size):
    adapter = get_registry().adapter("ddpm")
    x0, noise = calibration()
    reference = tiny_loaded()
    scanned, ref_losses, ref_grads = strided_reference(
        reference.model, reference.scheduler, x0, noise, threshold, 40, stride
    )
    seen = []
    loaded = tiny_loaded()
    scan = accumulate_gradients(
        loaded,
        adapter,
        x0,
        noise,
        threshold,
        timesteps=40,
        chunk=chunk,
        batch_size=batch_size,
        stride=stride,
        on_progress=lambda t, loss: seen.append(t),
    )
    assert scan.scanned_timesteps == scanned == seen, "exactly t = 0, K, 2K, ... up to the cutoff"
    assert scan.cutoff == scanned[-1] and scan.stride == stride
    assert scan.losses == pytest.approx(ref_losses, rel=1e-4)
    for name, parameter in loaded.model.named_parameters():
        torch.testing.assert_close(parameter.grad, ref_grads[name], rtol=1e-3, atol=1e-6, msg=name)
    if threshold == 0.0:
        assert scanned == list(range(0, 40, stride)) and not scan.stopped_early
    else:
        # the stopping rule on the strided losses: the last one is the first below threshold × running max
        running = [max(scan.losses[: i + 1]) for i in range(len(scan.losses))]
        below = [loss < peak * threshold for loss, peak in zip(scan.losses, running, strict=True)]
        assert scan.stopped_early and below[-1] and not any(below[:-1])
    whole_chunks = -(-len(scanned) // scan.chunk) * scan.chunk
    assert scan.samples_computed == len(x0) * min(len(range(0, 40, stride)), whole_chunks)


def test_forward_only_scan_leaves_no_gradients_and_finds_the_same_cutoff():
    adapter = get_registry().adapter("ddpm")
    x0, noise = calibration()
    with_gradients = accumulate_gradients(tiny_loaded(), adapter, x0, noise, 0.999, timesteps=40, stride=3)
    loaded = tiny_loaded()
    pilot = accumulate_gradients(loaded, adapter, x0, noise, 0.999, timesteps=40, stride=3, gradients=False)
    assert pilot.stopped_early and pilot.cutoff == with_gradients.cutoff
    assert pilot.losses == pytest.approx(with_gradients.losses, rel=1e-5)
    assert all(parameter.grad is None for parameter in loaded.model.parameters())


def score(dp, folder, images, output, *extra):
    common = ["--data", images, "--calib-size", "4", "--timesteps", "24", "--threshold", "0", "--json"]
    return dp("score", folder, *common, "-o", output, *extra)


def test_stride_one_is_the_default_scan_bit_for_bit(dp, tmp_path, tiny_unet_folder, image_folder):
    from safetensors.torch import load_file

    default = score(dp, tiny_unet_folder, image_folder, tmp_path / "a.safetensors")
    explicit = score(dp, tiny_unet_folder, image_folder, tmp_path / "b.safetensors", "--timestep-stride", "1")
    assert default.exit_code == 0 and explicit.exit_code == 0, explicit.stderr
    assert default.json["losses"] == explicit.json["losses"] and explicit.json["timestep_stride"] == 1
    first, second = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
def test_strided_score_reports_and_records_its_stride(dp, tmp_path, tiny_unet_folder, image_folder):
    from safetensors import safe_open
    from safetensors.torch import load_file

    full = score(dp, tiny_unet_folder, image_folder, tmp_path / "full.safetensors").json
    result = score(dp, tiny_unet_folder, image_folder, tmp_path / "s.safetensors", "--timestep-stride", "4")
    assert result.exit_code == 0, result.stderr
    report = result.json
    assert report["timestep_stride"] == 4 and report["cutoff"] == 20, "t = 0, 4, ..., 20 of 24 timesteps"
    assert report["timesteps_scanned"] == len(report["losses"]) == 6
    assert report["losses"] == pytest.approx(full["losses"][::4], rel=1e-5)
    assert report["samples"] == 4 * 6 and full["samples"] == 4 * 24
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()["settings"])["timestep_stride"] == 4
    # the gradients are scaled by the stride: scores keep the full scan's scale
    strided, every = load_file(tmp_path / "s.safetensors"), load_file(tmp_path / "full.safetensors")
    ratio = sum(float(strided[k].sum()) for k in every) / sum(float(every[k].sum()) for k in every)
    assert 0.5 < ratio < 2.0
    table = dp(
        "score",
        tiny_unet_folder,
        "--data",
        image_folder,
        "--calib-size",
        "4",
        "--timesteps",
        "24",
        "--threshold",
        "0",
        "--timestep-stride",
        "4",
    )
    assert "t = 0, 4, 8, ..." in table.stdout and "24 samples in" in table.stdout, table.stdout
    pruned = tmp_path / "pruned"
    assert (
        dp(
            "prune", tiny_unet_folder, "--scores", tmp_path / "s.safetensors", "--ratio", "0.3", "-o", pruned
        ).exit_code
        == 0
    )
    info = json.loads((pruned / "dpcli.json").read_text())
    assert info["pruning"]["scores"]["timestep_stride"] == 4 and info["pruning"]["cutoff"] == 20


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--timestep-stride", "0"], "--timestep-stride"),
        (["--scan-budget", "0"], "--scan-budget"),
        (
            ["--scan-budget", "500", "--calib-size", "4"],
            "--scan-budget chooses --timestep-stride and --calib-size",
        ),
        (["--scan-budget", "500", "--timestep-stride", "2"], "give the budget or those"),
        (["--scan-budget", "3", "--threshold", "0"], "--scan-budget is too small"),
    ],
)
def test_bad_stride_or_budget_exits_2_and_writes_nothing(
    dp, tmp_path, tiny_unet_folder, image_folder, extra, message
):
    output = tmp_path / "scores.safetensors"
    result = dp("score", tiny_unet_folder, "--data", image_folder, "--timesteps", "24", "-o", output, *extra)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not output.exists()
    pruned = dp(
        "prune",
        tiny_unet_folder,
        "--criterion",
        "diff-taylor",
        "--data",
        image_folder,
        "--ratio",
        "0.3",
        "--timesteps",
        "24",
        "-o",
        tmp_path / "p",
        *extra,
    )
    assert pruned.exit_code == 2 and message in pruned.stderr and not (tmp_path / "p").exists()


def test_budget_goes_to_images_at_stride_16_then_to_finer_strides():
    # cutoff 319: 20 timesteps at stride 16, 40 at 8, 80 at 4, 160 at 2, 320 at 1
    plan = plan_scan(1000, 319)
    assert (plan.timestep_stride, plan.calib_size, plan.estimated_samples) == (16, 50, 1000)
    most = plan_scan(BUDGET_MAX_CALIB * 100, 319)
    assert most.calib_size == BUDGET_MAX_CALIB and most.timestep_stride == 4  # 256 × 80 <= 25,600
    assert plan_scan(10**9, 319).timestep_stride == 1
    small_data = plan_scan(2000, 319, available=40)
    assert small_data.calib_size == 40 and small_data.timestep_stride == 8  # 40 × 40 = 1600 <= 2000
    with pytest.raises(BadSetting, match="at least 160 forward samples"):
        plan_scan(BUDGET_MIN_CALIB * 20 - 1, 319)


@pytest.mark.slow
def test_scan_budget_chooses_reports_and_keeps_to_it(dp, tmp_path, tiny_unet_folder, image_folder):
    output = tmp_path / "scores.safetensors"
    common = ["--data", image_folder, "--timesteps", "64", "--threshold", "0", "-o", output]
    result = dp("score", tiny_unet_folder, *common, "--scan-budget", "200", "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json
    plan = report["scan_budget"]
    # the pilot ran to the last timestep (threshold 0), so the scan will: cutoff about 63. 8 images in the
    # folder: all of them, then the finest stride that fits (stride 2: 8 × 32 > 200, stride 4: 8 × 16)
    assert plan["calib_size"] == report["calib_size"] == 8 and plan["estimated_cutoff"] == 63
    assert plan["timestep_stride"] == report["timestep_stride"] == 4
    assert report["samples"] == plan["estimated_samples"] == 128 and report["cutoff"] == 60
    assert plan["pilot_samples"] == 8 * 4, "the pilot: 8 images at stride 16, forward only"
    table = dp("score", tiny_unet_folder, *common, "--scan-budget", "200")
    assert "chose --timestep-stride 4 and --calib-size 8" in table.stdout, table.stdout
