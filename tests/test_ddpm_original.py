"""Conversion between the original DDPM state dict layout and diffusers' UNet2DModel."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from dpcli.adapters.ddpm_original import (
    DDPM_CONSTANTS,
    diffusers_to_original,
    infer_original_config,
    is_original_ddpm_state_dict,
    original_to_diffusers,
)
from dpcli.errors import BadInput

# google/ddpm-cifar10-32, the diffusers port of DDPM's CIFAR-10 model.
CIFAR10_CONFIG = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 256, 256],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 32,
    **DDPM_CONSTANTS,
}
CIFAR10_PARAMETER_COUNT = 35_746_307


def tiny_config(layers_per_block: int) -> dict:
    """Two levels (32 and 64 channels), attention at the lower resolution only."""
    return {
        "sample_size": 16,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [32, 64],
        "layers_per_block": layers_per_block,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 8,
        **DDPM_CONSTANTS,
    }


def random_model(config: dict) -> UNet2DModel:
    """Default random weights, plus random norm scales and biases (not 1 and 0) so that swaps show.

    The default init of the projections keeps the attention sharp enough to tell q from k.
    """
    torch.manual_seed(0)
    model = UNet2DModel.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                is_norm_scale = "norm" in name and name.endswith(".weight")
                parameter.normal_(1.0 if is_norm_scale else 0.0, 0.2)
    return model


def original_ddpm_forward(weights: dict, sample: torch.Tensor, timestep: int, norm_num_groups: int):
    """The forward pass of the original DDPM ``Model`` (pytorch_diffusion, DDIM) over its state dict.

    An independent reference: the conversion is right only if diffusers computes the same thing.
    """

    def norm(name, h):
        return F.group_norm(h, norm_num_groups, weights[f"{name}.weight"], weights[f"{name}.bias"], eps=1e-6)

    def conv(name, h, stride=1, padding=1):
        return F.conv2d(h, weights[f"{name}.weight"], weights[f"{name}.bias"], stride, padding)

    def linear(name, h):
        return F.linear(h, weights[f"{name}.weight"], weights[f"{name}.bias"])

    def resnet(name, h, temb):
        out = conv(f"{name}.conv1", F.silu(norm(f"{name}.norm1", h)))
        out = out + linear(f"{name}.temb_proj", F.silu(temb))[:, :, None, None]
        out = conv(f"{name}.conv2", F.silu(norm(f"{name}.norm2", out)))
        if f"{name}.nin_shortcut.weight" in weights:
            h = conv(f"{name}.nin_shortcut", h, padding=0)
        return h + out

    def attention(name, h):
        batch, channels, height, width = h.shape
        normed = norm(f"{name}.norm", h)
        q, k, v = (conv(f"{name}.{part}", normed, padding=0).reshape(batch, channels, -1) for part in "qkv")
        attention_weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * channels**-0.5, dim=2)
        out = torch.bmm(v, attention_weights.transpose(1, 2)).reshape(batch, channels, height, width)
        return h + conv(f"{name}.proj_out", out, padding=0)

    channels = weights["conv_in.weight"].shape[0]
    num_levels = 1 + max(int(key.split(".")[1]) for key in weights if key.startswith("down."))
    num_res_blocks = 1 + max(int(key.split(".")[3]) for key in weights if key.startswith("down.0.block."))

    half = channels // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    angles = torch.full((sample.shape[0], 1), float(timestep)) * frequencies[None]
    temb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    temb = linear("temb.dense.1", F.silu(linear("temb.dense.0", temb)))

    skips = [conv("conv_in", sample)]
    for level in range(num_levels):
        for block in range(num_res_blocks):
            h = resnet(f"down.{level}.block.{block}", skips[-1], temb)
            if f"down.{level}.attn.{block}.q.weight" in weights:
                h = attention(f"down.{level}.attn.{block}", h)
            skips.append(h)
        if level != num_levels - 1:
            skips.append(
                conv(f"down.{level}.downsample.conv", F.pad(skips[-1], (0, 1, 0, 1)), stride=2, padding=0)
            )
    h = resnet("mid.block_2", attention("mid.attn_1", resnet("mid.block_1", skips[-1], temb)), temb)
    for level in reversed(range(num_levels)):
        for block in range(num_res_blocks + 1):
            h = resnet(f"up.{level}.block.{block}", torch.cat([h, skips.pop()], dim=1), temb)
            if f"up.{level}.attn.{block}.q.weight" in weights:
                h = attention(f"up.{level}.attn.{block}", h)
        if level != 0:
            h = conv(f"up.{level}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return conv("conv_out", F.silu(norm("norm_out", h)))


@pytest.fixture(params=[1, 2], ids=["1-layer", "2-layers"])
def tiny(request):
    config = tiny_config(request.param)
    model = random_model(config)
    return config, model, diffusers_to_original(model.state_dict(), config)


def test_original_layout_keys_and_shapes(tiny):
    config, _, original = tiny
    layers = config["layers_per_block"]
    assert original["conv_in.weight"].shape == (32, 3, 3, 3)
    assert original["temb.dense.0.weight"].shape == (128, 32)
    assert original["temb.dense.1.weight"].shape == (128, 128)
    assert original["down.0.downsample.conv.weight"].shape == (32, 32, 3, 3)
    assert original["down.1.block.0.nin_shortcut.weight"].shape == (64, 32, 1, 1)
    assert original["down.1.block.0.temb_proj.weight"].shape == (64, 128)
    # Attention projections are 1x1 convolutions in the original.
    assert original["down.1.attn.0.q.weight"].shape == (64, 64, 1, 1)
    assert original["mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)
    assert original["mid.block_2.conv2.weight"].shape == (64, 64, 3, 3)
    # `up` is indexed by resolution level: up.0 works at 32 channels, up.1 (diffusers up_blocks.0) at 64.
    assert original[f"up.0.block.{layers}.conv1.weight"].shape[0] == 32
    assert original[f"up.1.block.{layers}.conv1.weight"].shape[0] == 64
    assert original[f"up.1.attn.{layers}.norm.weight"].shape == (64,)
    assert original["up.1.upsample.conv.weight"].shape == (64, 64, 3, 3)
    assert "up.0.upsample.conv.weight" not in original
    assert not any(key.startswith("up.0.attn.") for key in original)
    assert original["norm_out.weight"].shape == (32,)


def test_recognises_the_original_layout(tiny):
    _, model, original = tiny
    assert is_original_ddpm_state_dict(original)
    assert is_original_ddpm_state_dict(f"module.{key}" for key in original)
    assert not is_original_ddpm_state_dict(model.state_dict())


def test_infers_the_block_structure(tiny):
    config, _, original = tiny
    inferred, notes = infer_original_config(original)
    for name in [
        "block_out_channels",
        "layers_per_block",
        "down_block_types",
        "up_block_types",
        "in_channels",
    ]:
        assert inferred[name] == config[name], name
    assert inferred["sample_size"] == 32
    assert {name: inferred[name] for name in DDPM_CONSTANTS} == DDPM_CONSTANTS
    assert any("sample_size" in note and "ASSUMED" in note for note in notes)
    assert any("norm_num_groups" in note and "ASSUMED" in note for note in notes)


def test_round_trip_is_exact_and_leaves_the_input_alone(tiny):
    config, model, original = tiny
    original_before = {key: tensor.clone() for key, tensor in original.items()}
    back = original_to_diffusers(original, config)
    state_dict = model.state_dict()
    assert list(back) == list(state_dict)
    assert all(torch.equal(back[key], state_dict[key]) for key in state_dict)
    assert original.keys() == original_before.keys()
    assert all(torch.equal(original[key], original_before[key]) for key in original)


def test_rebuilt_model_gives_identical_output(tiny):
    config, model, original = tiny
    inferred, _ = infer_original_config(original)
    inferred.update(norm_num_groups=config["norm_num_groups"], sample_size=config["sample_size"])
    rebuilt = UNet2DModel.from_config(inferred).eval()
    rebuilt.load_state_dict(original_to_diffusers(original, inferred), strict=True)
    sample = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(sample, 500).sample
        actual = rebuilt(sample, 500).sample
    assert torch.equal(actual, expected)


def test_original_model_computes_what_diffusers_computes(tiny):
    config, model, original = tiny
    sample = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(sample, 500).sample
        actual = original_ddpm_forward(original, sample, 500, config["norm_num_groups"])
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_strips_the_data_parallel_prefix(tiny):
    config, model, original = tiny
    prefixed = {f"module.{key}": tensor for key, tensor in original.items()}
    assert infer_original_config(prefixed)[0]["block_out_channels"] == config["block_out_channels"]
    converted = original_to_diffusers(prefixed, config)
    assert converted.keys() == model.state_dict().keys()


def test_cifar10_config_round_trips_its_structure():
    with torch.device("meta"):  # shapes only
        model = UNet2DModel.from_config(CIFAR10_CONFIG)
    original = diffusers_to_original(model.state_dict(), CIFAR10_CONFIG)
    assert sum(tensor.numel() for tensor in original.values()) == CIFAR10_PARAMETER_COUNT
    inferred, notes = infer_original_config(original)
    assert inferred == CIFAR10_CONFIG
    assert not any("sample_size" in note for note in notes)
    assert original_to_diffusers(original, inferred).keys() == model.state_dict().keys()


def test_missing_key_is_bad_input(tiny):
    config, _, original = tiny
    incomplete = {key: tensor for key, tensor in original.items() if key != "mid.attn_1.k.weight"}
    with pytest.raises(BadInput, match=r"missing 1 \(mid\.attn_1\.k\.weight\)"):
        original_to_diffusers(incomplete, config)


def test_unexpected_key_is_bad_input(tiny):
    config, _, original = tiny
    with pytest.raises(BadInput, match=r"unexpected 1 \(logvar\)"):
        original_to_diffusers({**original, "logvar": torch.zeros(1000)}, config)


def test_wrong_shape_is_bad_input(tiny):
    config, _, original = tiny
    with pytest.raises(BadInput, match=r"conv_out\.weight is \(4, 32, 3, 3\)"):
        original_to_diffusers({**original, "conv_out.weight": torch.zeros(4, 32, 3, 3)}, config)


def test_diffusers_state_dict_is_not_an_original_one(tiny):
    _, model, _ = tiny
    with pytest.raises(BadInput, match="not an original DDPM state dict"):
        infer_original_config(model.state_dict())
