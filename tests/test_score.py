"""The timestep scan: packed timesteps give exactly the reference algorithm's cutoff and gradients."""

import pytest
import torch
from helpers.scan import calibration

from dpcli.errors import DpError
from dpcli.plugins import get_registry
from dpcli.scoring import accumulate_gradients
from dpcli.testing import tiny_loaded


def reference_scan(model, scheduler, clean_images, noise, threshold, total):
    """The authors' loop (ddpm_prune.py), one timestep per forward."""
    model.eval()
    model.zero_grad()
    loss_max = 0
    losses = []
    for step_k in range(total):
        timesteps = (step_k * torch.ones((clean_images.shape[0],))).long()
        noisy_images = scheduler.add_noise(clean_images, noise, timesteps)
        model_output = model(noisy_images, timesteps).sample
        loss = torch.nn.functional.mse_loss(model_output, noise)
        loss.backward()
        losses.append(loss.item())
        if loss > loss_max:
            loss_max = loss
        if loss < loss_max * threshold:
            break
    return step_k, losses, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "threshold, chunk, batch_size",
    [(0.0, 7, 256), (0.995, 4, 256), (0.999, 3, 256), (0.995, 1, 256), (0.995, 8, 4)],
    ids=["all-steps-chunk7", "early-chunk4", "early-chunk3", "chunk1", "micro-batched"],
)
@pytest.mark.slow
def test_packed_scan_equals_reference(threshold, chunk, batch_size):
    adapter = get_registry().adapter("ddpm")
    x0, noise = calibration()
    reference = tiny_loaded()
    ref_cutoff, ref_losses, ref_grads = reference_scan(
        reference.model, reference.scheduler, x0, noise, threshold, 24
    )
    packed = tiny_loaded()
    scan = accumulate_gradients(
        packed, adapter, x0, noise, threshold, timesteps=24, chunk=chunk, batch_size=batch_size
    )
    assert scan.cutoff == ref_cutoff
    assert scan.losses == pytest.approx(ref_losses, rel=1e-4)
    for name, parameter in packed.model.named_parameters():
        torch.testing.assert_close(parameter.grad, ref_grads[name], rtol=1e-3, atol=1e-6, msg=name)
    if threshold == 0.0:
        assert scan.cutoff == 23 and not scan.stopped_early
    if chunk > 1 and batch_size >= len(x0) * chunk:
        assert scan.forward_passes == -(-(scan.cutoff + 1) // chunk)


def test_nan_in_the_model_is_an_error_not_garbage():
    adapter = get_registry().adapter("ddpm")
    loaded = tiny_loaded()
    with torch.no_grad():
        loaded.model.conv_in.weight[0, 0, 0, 0] = float("nan")
    x0, noise = calibration()
    with pytest.raises(DpError, match="NaN"):
        accumulate_gradients(loaded, adapter, x0, noise, 0.1, timesteps=4, chunk=2)


@pytest.mark.slow
def test_score_cli_writes_scores_plot_and_json(dp, tmp_path, tiny_unet_folder, image_folder):
    scores = tmp_path / "scores.safetensors"
    plot = tmp_path / "loss.png"
    result = dp(
        "score",
        tiny_unet_folder,
        "--data",
        image_folder,
        "--criterion",
        "diff-taylor",
        "--threshold",
        "0.995",
        "--calib-size",
        "4",
        "--timesteps",
        "30",
        "--output",
        scores,
        "--plot",
        plot,
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    report = result.json
    assert report["cutoff"] == len(report["losses"]) - 1
    assert report["criterion"] == "diff-taylor" and report["seconds"] > 0
    assert report["chunk"] == 16, "by default 64 samples per forward: 16 timesteps of 4 images"
    assert report["groups"] > 5 and all(layer["channels"] > 0 for layer in report["layers"])
    assert scores.stat().st_size > 0 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # stderr is not a terminal here (as in a batch job): the progress bar becomes log lines.
    scan_log = [line for line in result.stderr.splitlines() if line.startswith("Timestep scan")]
    assert 1 <= len(scan_log) <= 21, result.stderr
    assert "(100 %)" in scan_log[-1] and f"loss={report['losses'][-1]:.4f}" in scan_log[-1]
    table = dp("score", tiny_unet_folder, "--criterion", "magnitude")
    assert table.exit_code == 0 and "Scores per group" in table.stdout


def test_score_is_deterministic(tiny_unet_folder, image_folder, tmp_path, dp):
    from safetensors.torch import load_file

    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for path in paths:
        assert (
            dp(
                "score",
                tiny_unet_folder,
                "--data",
                image_folder,
                "--calib-size",
                "4",
                "--timesteps",
                "6",
                "--threshold",
                "0",
                "-o",
                path,
            ).exit_code
            == 0
        )
    first, second = (load_file(p) for p in paths)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
