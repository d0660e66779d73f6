"""Fine-tuning memory options: --gradient-checkpointing, --optimizer, a bf16 teacher."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

import dpcli
from dpcli.testing import make_image_folder, save_tiny_unet


@pytest.fixture
def files(tmp_path):
    return save_tiny_unet(tmp_path / "unet"), make_image_folder(tmp_path / "images", count=4)


def tune(files, **options):
    model, images = files
    losses = []
    tuned = dpcli.finetune(
        dpcli.load(model),
        data=images,
        steps=2,
        batch_size=2,
        workers=0,
        grad_clip=0.0,
        on_step=lambda info: losses.append(info.loss),
        **options,
    )
    return tuned, losses


def test_gradient_checkpointing_trains_to_the_same_losses_and_weights(files):
    plain, plain_losses = tune(files)
    checkpointed, checkpointed_losses = tune(files, gradient_checkpointing=True)
    assert checkpointed_losses == pytest.approx(plain_losses, rel=1e-5)
    for (name, a), b in zip(
        plain.module.state_dict().items(), checkpointed.module.state_dict().values(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name
    assert not checkpointed.module.is_gradient_checkpointing, "switched off after training"
    assert checkpointed.record["history"][-1]["steps"] == 2


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_8bit_optimizer_without_bitsandbytes_is_refused_in_one_line(dp, files, tmp_path):
    model, images = files
    out = tmp_path / "out"
    args = ["finetune", model, "--data", images, "--steps", "1", "--optimizer", "adamw8bit", "-o", out]
    result = dp(*args)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "Error: --optimizer adamw8bit needs the bitsandbytes package (pip install bitsandbytes)"
    ]
    assert not out.exists()
    unknown = dp("finetune", model, "--data", images, "--steps", "1", "--optimizer", "sgd", "-o", out)
    assert unknown.exit_code == 2 and "--optimizer must be one of adamw, adamw8bit" in unknown.stderr


def test_8bit_optimizer_is_bitsandbytes_adamw8bit(files, monkeypatch):
    made = []

    class AdamW8bit(torch.optim.AdamW):  # stands in for bitsandbytes' class (its kernels need CUDA)
        def __init__(self, params, lr, weight_decay):
            made.append((lr, weight_decay))
            super().__init__(params, lr=lr, weight_decay=weight_decay)

    package = types.ModuleType("bitsandbytes")
    package.optim = types.ModuleType("bitsandbytes.optim")
    package.optim.AdamW8bit = AdamW8bit
    monkeypatch.setitem(sys.modules, "bitsandbytes", package)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", package.optim)
    tuned, losses = tune(files, optimizer="adamw8bit", lr=1e-3)
    assert made == [(1e-3, 0.0)] and len(losses) == 2
    assert tuned.record["history"][-1]["steps"] == 2


def test_teacher_is_held_in_bf16_at_bf16_precision(files):
    model, _ = files
    teacher = dpcli.load(model)
    tuned, losses = tune(files, teacher=teacher, precision="bf16")
    assert {p.dtype for p in teacher.module.parameters()} == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(losses)))
    assert {p.dtype for p in tuned.module.parameters()} == {torch.float32}, "the student stays float32"
