"""``dp prune --layout diffusers``: pruned models that plain diffusers loads (no dpcli imported)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from test_ldm import built  # noqa: F401  (``built`` is a fixture)

import dpcli

# Runs in a fresh interpreter that never imports dpcli: loads OUT/unet and the pipeline folder OUT with
# from_pretrained, runs the UNet on the inputs saved by the test and one pipeline sample.
PLAIN = textwrap.dedent(
    """
    import json, sys
    import torch
    from diffusers import DiffusionPipeline, {unet_class}

    folder, inputs, output = sys.argv[1:4]
    unet, info = {unet_class}.from_pretrained(folder + "/unet", output_loading_info=True)
    problems = {{k: v for k, v in info.items() if v}}
    assert not problems, problems
    data = torch.load(inputs)
    with torch.no_grad():
        result = unet(data["sample"], data["timesteps"], *data["extra"]).sample
    pipe = DiffusionPipeline.from_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    images = pipe({pipe_args}, num_inference_steps=2, generator=generator, output_type="np").images
    assert images.shape[0] == 1 and images.min() >= 0 and images.max() <= 1, images.shape
    torch.save({{"output": result, "pipeline": type(pipe).__name__,
                 "widths": list(unet.config.block_out_channels)}}, output)
    assert not any(name.split(".")[0] == "dpcli" for name in sys.modules), "dpcli was imported"
    """
)


def plain_diffusers(folder, tmp_path, unet_class, pipe_args, sample, timesteps, extra=()):
    """What plain diffusers computes for ``folder`` in a subprocess (see PLAIN)."""
    inputs, output = tmp_path / "inputs.pt", tmp_path / "output.pt"
    torch.save({"sample": sample, "timesteps": timesteps, "extra": list(extra)}, inputs)
    script = PLAIN.format(unet_class=unet_class, pipe_args=pipe_args)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(folder), str(inputs), str(output)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(output)


def expected_pruned(tensor: torch.Tensor, kept: dict) -> torch.Tensor:
    if "out" in kept:
        tensor = tensor.index_select(0, torch.tensor(kept["out"]))
    if "in" in kept and tensor.dim() > 1:
        tensor = tensor.index_select(1, torch.tensor(kept["in"]))
    return tensor


@pytest.mark.slow
def test_digits_in_the_diffusers_layout_load_with_plain_from_pretrained(dp, tmp_path):
    out = tmp_path / "pruned"
    result = dp(
        "prune", "builtin:ddpm-digits", "--criterion", "magnitude", "--target-macs", "0.56",
        "--layout", "diffusers", "-o", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = result.json
    assert report["layout"] == "diffusers" and report["level_widths"] == [24, 48, 48]
    assert abs(report["macs_fraction"] - 0.56) < 0.05 * 0.56
    config = json.loads((out / "unet" / "config.json").read_text())
    assert config["block_out_channels"] == [24, 48, 48] and config["time_embedding_dim"] == 128
    info = json.loads((out / "dpcli.json").read_text())
    assert info["pruning"]["layout"] == "diffusers" and info["base"]["config"] == config
    assert info["original_modules"]["conv_in"]["out_channels"] == 32

    torch.manual_seed(0)
    sample, timesteps = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    plain = plain_diffusers(out, tmp_path, "UNet2DModel", "batch_size=1", sample, timesteps)
    assert plain["pipeline"] == "DDPMPipeline" and plain["widths"] == [24, 48, 48]
    ours = dpcli.load(out)
    with torch.no_grad():
        mine = ours.module(sample, timesteps).sample
    assert torch.allclose(mine, plain["output"], atol=1e-5)

    # every pruned weight is the original's at the recorded kept channels (the time embedding's first
    # layer is refit for the smaller sinusoid: recorded as such)
    original = dpcli.load("builtin:ddpm-digits").module.state_dict()
    kept = info["pruning"]["kept_channels"]
    for name, tensor in ours.module.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module == "time_embedding.linear_1" and name.endswith("weight"):
            assert info["pruning"]["layout_details"]["time_frequencies"]["exact"] is False
            continue
        assert torch.equal(expected_pruned(original[name], kept.get(module, {})), tensor), name


@pytest.mark.slow
def test_tiny_stable_diffusion_in_the_diffusers_layout_loads_as_a_plain_pipeline(dp, built, tmp_path):  # noqa: F811
    out = tmp_path / "pruned"
    result = dp(
        "prune", built["sd"], "--criterion", "diff-taylor", "--ratio", "0.5", "--layout", "diffusers",
        "--data", built["images"], "--calib-size", "4", "--timesteps", "6", "-o", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.json["level_widths"] == [16, 32]
    ours = dpcli.load(out)
    block = ours.module.down_blocks[0].attentions[0].transformer_blocks[0]
    assert block.attn2.to_k.in_features == 64 and block.attn1.heads == 4  # cross width and heads kept
    torch.manual_seed(0)
    sample, timesteps, text = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 64)
    plain = plain_diffusers(
        out, tmp_path, "UNet2DConditionModel", 'prompt="a red square", height=16, width=16', sample,
        timesteps, [text],
    )  # fmt: skip
    assert plain["pipeline"] == "StableDiffusionPipeline" and plain["widths"] == [16, 32]
    with torch.no_grad():
        mine = ours.module(sample, timesteps, text).sample
    assert torch.allclose(mine, plain["output"], atol=1e-5)
    assert json.loads((out / "unet" / "config.json").read_text())["time_embedding_dim"] == 128


def test_the_python_api_prunes_into_the_diffusers_layout(tmp_path):
    model = dpcli.load("builtin:ddpm-digits")
    dpcli.prune(model, criterion="magnitude", ratio=0.5, layout="diffusers")
    assert list(model.module.config.block_out_channels) == [16, 32, 32]
    model.save(tmp_path / "api")
    assert json.loads((tmp_path / "api" / "unet" / "config.json").read_text())["block_out_channels"] == [
        16,
        32,
        32,
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layout", "wide", "--ratio", "0.5"], "--layout"),
        (["--layout", "diffusers", "--ratio", "0.5", "--ignore", "conv_in"], "--ignore"),
        (["--layout", "diffusers", "--ratio", "0.5", "--head-ratio", "0.5"], "--head-ratio"),
    ],
)
def test_bad_layout_settings_are_one_line_and_write_nothing(dp, tmp_path, args, message):
    out = tmp_path / "never"
    result = dp("prune", "builtin:ddpm-digits", "--criterion", "magnitude", *args, "-o", out)
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


@pytest.mark.slow  # ~55 CPU-seconds: fresh interpreters load the pipeline, a ControlNet pipeline samples
def test_tiny_sdxl_in_the_diffusers_layout_loads_as_a_plain_pipeline(dp, tmp_path):
    """SDXL (two text encoders, text_time added conditioning, transformer_layers_per_block (1, 2)): the
    pruned folder is a StableDiffusionXLPipeline plain diffusers loads, its UNet computes what dp's does."""
    from test_sdxl import write_sdxl_pipeline

    source = write_sdxl_pipeline(tmp_path / "sdxl", tmp_path / "tokenizer-files")
    out = tmp_path / "pruned"
    result = dp(
        "prune", source, "--criterion", "magnitude", "--ratio", "0.5", "--layout", "diffusers", "-o", out, "--json"
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.json["layout"] == "diffusers" and result.json["level_widths"] == [16, 32]
    config = json.loads((out / "unet" / "config.json").read_text())
    assert config["block_out_channels"] == [16, 32] and config["addition_embed_type"] == "text_time"
    assert config["transformer_layers_per_block"] == [1, 2]
    ours = dpcli.load(out)
    block = ours.module.down_blocks[1].attentions[0].transformer_blocks[1]
    assert block.attn2.to_k.in_features == 64  # the text width is untouched
    assert ours.module.add_embedding.linear_1.in_features == 80  # so is the added conditioning

    torch.manual_seed(0)
    sample, timesteps, text = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 64)
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    extra = [text, None, None, None, None, added]
    plain = plain_diffusers(
        out, tmp_path, "UNet2DConditionModel", 'prompt="a red square", height=16, width=16', sample,
        timesteps, extra,
    )  # fmt: skip
    assert plain["pipeline"] == "StableDiffusionXLPipeline" and plain["widths"] == [16, 32]
    with torch.no_grad():
        mine = ours.module(sample, timesteps, *extra).sample
        original = dpcli.load(source).module(sample, timesteps, *extra).sample
    assert mine.shape == original.shape == (2, 4, 8, 8)
    assert torch.allclose(mine, plain["output"], atol=1e-5)

    # a ControlNet made for the original SDXL UNet, sliced, drives the plain SDXL ControlNet pipeline
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    from dpcli.slicing import load_controlnet

    torch.manual_seed(1)
    controlnet = ControlNetModel.from_unet(
        dpcli.load(source).module, conditioning_embedding_out_channels=(16, 32)
    )
    with torch.no_grad():  # its output convolutions start at zero: give them something to carry
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.05)
    controlnet.save_pretrained(tmp_path / "controlnet")
    result = dp("slice", tmp_path / "controlnet", "--model", out, "-o", tmp_path / "sliced", "--json")
    assert result.exit_code == 0, result.stderr
    sliced = load_controlnet(tmp_path / "sliced")
    condition = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = controlnet(sample, timesteps, text, condition, added_cond_kwargs=added, return_dict=False)
        part = sliced(sample, timesteps, text, condition, added_cond_kwargs=added, return_dict=False)
    kept = json.loads((out / "dpcli.json").read_text())["pruning"]["kept_channels"]
    assert [r.shape[1] for r in [*part[0], part[1]]] == [16] * 4 + [32] * 3  # the pruned level widths
    assert torch.allclose(part[0][0], full[0][0][:, kept["conv_in"]["out"]], atol=1e-6)
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(out, controlnet=sliced)
    images = pipe(
        "a red square", image=condition[:1], height=16, width=16, num_inference_steps=2, output_type="pt"
    ).images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
