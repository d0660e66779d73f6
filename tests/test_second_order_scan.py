"""The scan's second-order mode: Σ_t g_t² over timesteps 0..cutoff, whatever the packing or batch split."""

import pytest
import torch

from dpcli.plugins import get_registry
from dpcli.scoring import accumulate_gradients
from dpcli.testing import tiny_loaded


def reference_squared_scan(model, scheduler, x0, noise, threshold, total):
    """One timestep at a time: square each timestep's gradient, sum; stop like Diff-Pruning."""
    model.eval()
    squares = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    loss_max = 0.0
    for step in range(total):
        model.zero_grad()
        timesteps = torch.full((x0.shape[0],), step, dtype=torch.long)
        loss = torch.nn.functional.mse_loss(
            model(scheduler.add_noise(x0, noise, timesteps), timesteps).sample, noise
        )
        loss.backward()
        for name, parameter in model.named_parameters():
            squares[name] += parameter.grad.pow(2)
        loss_max = max(loss_max, loss.item())
        if loss.item() < loss_max * threshold:
            break
    return step, squares


@pytest.mark.parametrize("chunk, batch_size", [(4, 256), (4, 2)], ids=["packing-requested", "micro-batched"])
def test_squared_scan_matches_per_timestep_reference(chunk, batch_size):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1
    noise = torch.randn(4, 3, 16, 16, generator=generator)
    reference = tiny_loaded(seed=1)
    cutoff, expected = reference_squared_scan(reference.model, reference.scheduler, x0, noise, 0.995, 5)

    loaded = tiny_loaded(seed=1)
    adapter = get_registry().adapter("ddpm")
    result = accumulate_gradients(
        loaded, adapter, x0, noise, 0.995, timesteps=5, chunk=chunk, batch_size=batch_size, squared=True
    )
    assert result.cutoff == cutoff and result.chunk == 1
    for name, parameter in loaded.model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-4, atol=1e-10, msg=name)
