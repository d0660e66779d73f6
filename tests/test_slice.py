"""``dp slice``: LoRAs and ControlNets made for the original model, carried onto the pruned one."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.latent import cross_attention_unet
from safetensors.torch import load_file, save_file
from test_ldm import built  # noqa: F401  (``built`` is a fixture)

import dpcli

BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0"
LINEAR_TARGETS = [
    f"{BLOCK}.attn1.to_q",
    f"{BLOCK}.attn1.to_v",
    f"{BLOCK}.attn1.to_out.0",
    f"{BLOCK}.attn2.to_k",  # cross-attention: its input (the text width) is never pruned
    f"{BLOCK}.ff.net.2",
    "down_blocks.0.attentions.0.proj_in",
    "up_blocks.1.resnets.0.time_emb_proj",
]
CONV_TARGETS = ["down_blocks.1.resnets.0.conv1"]
RANK = 4


@pytest.fixture(scope="module")
def pruned(built, tmp_path_factory):  # noqa: F811
    """The tiny SD pipeline pruned in each layout (magnitude, ratio 0.5)."""
    from dpcli.testing import invoke

    root = tmp_path_factory.mktemp("slice")
    made = {}
    for layout in ("free", "diffusers"):
        out = root / layout
        result = invoke(
            "prune", built["sd"], "--criterion", "magnitude", "--ratio", "0.5", "--layout", layout, "-o", out
        )
        assert result.exit_code == 0, result.stderr
        made[layout] = out
    return made


def original_unet():
    return cross_attention_unet()  # the same seed as the fixture's pipeline UNet


def make_lora(layout: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random LoRA matrices for the original UNet's modules, in the diffusers/PEFT or kohya layout."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(original_unet().named_modules())
    tensors = {}
    targets = LINEAR_TARGETS + (CONV_TARGETS if layout == "peft" else [])
    for name in targets:
        module = modules[name]
        if isinstance(module, torch.nn.Conv2d):
            down = torch.randn(RANK, module.in_channels, *module.kernel_size, generator=generator)
            up = torch.randn(module.out_channels, RANK, 1, 1, generator=generator)
        else:
            down = torch.randn(RANK, module.in_features, generator=generator)
            up = torch.randn(module.out_features, RANK, generator=generator)
        down, up = down * 0.1, up * 0.1
        if layout == "peft":
            tensors[f"unet.{name}.lora_A.weight"] = down
            tensors[f"unet.{name}.lora_B.weight"] = up
        else:
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(float(RANK))
    return tensors


def delta(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return up.flatten(1) @ down.flatten(1)


def kept_of(folder):
    return json.loads((folder / "dpcli.json").read_text())["pruning"]["kept_channels"]


def sliced_delta_is_exact(original: dict, sliced: dict, kept: dict, keys) -> None:
    for name, down_key, up_key in keys:
        full = delta(original[down_key], original[up_key]).view(original[up_key].shape[0], -1)
        sides = kept.get(name, {})
        rows = torch.tensor(sides["out"]) if "out" in sides else torch.arange(full.shape[0])
        down = original[down_key]
        width_in = down.shape[1]
        columns = torch.tensor(sides["in"]) if "in" in sides else torch.arange(width_in)
        per_channel = down[0, 0].numel() if down.dim() > 2 else 1
        columns = (columns[:, None] * per_channel + torch.arange(per_channel)).flatten()
        expected = full[rows][:, columns]
        assert torch.equal(delta(sliced[down_key], sliced[up_key]), expected), name


@pytest.mark.parametrize("layout", ["free", "diffusers"])
@pytest.mark.parametrize("lora_layout", ["peft", "kohya"])
@pytest.mark.slow
def test_a_lora_sliced_is_exact_and_loads_into_the_pruned_pipeline(
    dp,
    built,  # noqa: F811
    pruned,
    tmp_path,
    layout,
    lora_layout,
):
    lora = make_lora(lora_layout)
    source = tmp_path / "lora.safetensors"
    save_file(lora, source, metadata={"trainer": "test"})
    out = tmp_path / "sliced"
    result = dp("slice", source, "--model", pruned[layout], "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json
    targets = LINEAR_TARGETS + (CONV_TARGETS if lora_layout == "peft" else [])
    assert report["kind"] == "lora" and report["layout"] == lora_layout
    assert report["modules_sliced"] + report["modules_unchanged"] == len(targets)
    assert report["modules_sliced"] >= len(targets) - 1 and report["params_after"] < report["params_before"]

    sliced = load_file(out / "pytorch_lora_weights.safetensors")
    assert set(sliced) == set(lora)  # the same layout, the same entries
    if lora_layout == "peft":
        keys = [(n, f"unet.{n}.lora_A.weight", f"unet.{n}.lora_B.weight") for n in targets]
    else:
        keys = [
            (
                n,
                f"lora_unet_{n.replace('.', '_')}.lora_down.weight",
                f"lora_unet_{n.replace('.', '_')}.lora_up.weight",
            )
            for n in targets
        ]
    sliced_delta_is_exact(lora, sliced, kept_of(pruned[layout]), keys)

    # the pruned pipeline takes it, and it changes what the UNet computes
    model = dpcli.load(pruned[layout])
    pipe = model.pipeline()
    sample, timesteps, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 5, 64)
    with torch.no_grad():
        before = pipe.unet(sample, timesteps, text).sample
    pipe.load_lora_weights(str(out))
    with torch.no_grad():
        after = pipe.unet(sample, timesteps, text).sample
    assert not torch.allclose(before, after)
    # fused into the weights, the pruned layers are the original fused layers at the kept channels
    pipe.fuse_lora()
    reference = dpcli.load(built["sd"]).pipeline()
    reference.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    reference.fuse_lora()
    kept = kept_of(pruned[layout])
    pruned_modules, original_modules = dict(pipe.unet.named_modules()), dict(reference.unet.named_modules())
    for name in targets:
        fused, original = (
            getattr(m[name], "base_layer", m[name]).weight for m in (pruned_modules, original_modules)
        )
        assert torch.allclose(expected_pruned(original, kept.get(name, {})), fused, atol=1e-6), name


def expected_pruned(tensor: torch.Tensor, kept: dict) -> torch.Tensor:
    if "out" in kept:
        tensor = tensor.index_select(0, torch.tensor(kept["out"]))
    if "in" in kept:
        tensor = tensor.index_select(1, torch.tensor(kept["in"]))
    return tensor


def test_a_lora_on_the_plain_diffusers_pipeline_of_a_diffusers_layout_model(pruned, dp, tmp_path):
    from diffusers import StableDiffusionPipeline

    source = tmp_path / "lora.safetensors"
    save_file(make_lora("peft"), source)
    out = tmp_path / "sliced"
    assert dp("slice", source, "--model", pruned["diffusers"], "-o", out).exit_code == 0
    pipe = StableDiffusionPipeline.from_pretrained(pruned["diffusers"])
    pipe.load_lora_weights(str(out))
    images = pipe("a red square", height=16, width=16, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3)


def test_a_lora_module_the_pruned_model_no_longer_has_is_dropped_with_a_note(pruned, tmp_path):
    from dpcli.slicing import read_pruned, slice_lora

    record = read_pruned(pruned["free"])
    record.modules = {k: v for k, v in record.modules.items() if k != LINEAR_TARGETS[0]}
    sliced, report = slice_lora(make_lora("peft"), record)
    assert report.dropped == [LINEAR_TARGETS[0]] and LINEAR_TARGETS[0] in report.notes[0]
    assert f"unet.{LINEAR_TARGETS[0]}.lora_A.weight" not in sliced


def controlnet_of(unet, seed: int = 1):
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():  # its output convolutions start at zero: give them something to carry
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.05)
            conv.bias.normal_(0, 0.05)
    return controlnet.eval()


def control_pipeline(model, controlnet):
    from diffusers import StableDiffusionControlNetPipeline

    pipe = model.pipeline()
    return StableDiffusionControlNetPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        controlnet=controlnet,
        scheduler=pipe.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def controlnet_samples(model, controlnet, seed: int = 0):
    pipe = control_pipeline(model, controlnet)
    condition = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        ["a red square", "a blue circle"], image=condition, height=16, width=16, num_inference_steps=4,
        generator=generator, output_type="pt",
    ).images  # fmt: skip


def without_effect(controlnet):
    """A copy of ``controlnet`` whose outputs are all zero."""
    import copy

    silent = copy.deepcopy(controlnet)
    with torch.no_grad():
        for conv in [*silent.controlnet_down_blocks, silent.controlnet_mid_block]:
            conv.weight.zero_()
            conv.bias.zero_()
    return silent


@pytest.mark.parametrize("layout", ["free", "diffusers"])
def test_a_controlnet_sliced_runs_with_the_pruned_pipeline(dp, built, pruned, tmp_path, layout):  # noqa: F811
    from dpcli.slicing import load_controlnet

    original = dpcli.load(built["sd"])
    controlnet = controlnet_of(original.module)
    controlnet.save_pretrained(tmp_path / "controlnet")
    out = tmp_path / "sliced"
    result = dp("slice", tmp_path / "controlnet", "--model", pruned[layout], "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json
    assert report["kind"] == "controlnet" and report["modules_sliced"] >= 4
    assert "approximation" in report["notes"][0]
    sliced = load_controlnet(out)
    model = dpcli.load(pruned[layout])
    kept = kept_of(pruned[layout])
    assert sliced.controlnet_down_blocks[0].out_channels == len(kept["conv_in"]["out"])
    assert torch.equal(
        sliced.controlnet_down_blocks[0].weight,
        controlnet.controlnet_down_blocks[0].weight[kept["conv_in"]["out"]],
    )
    with torch.no_grad():
        pruned_images = controlnet_samples(model, sliced)
        original_images = controlnet_samples(original, controlnet)
    assert pruned_images.shape == original_images.shape == (2, 3, 16, 16)
    assert torch.isfinite(pruned_images).all()
    # the sliced ControlNet steers the pruned pipeline (how closely: benchmarks/slice_controlnet.py)
    with torch.no_grad():
        unsteered = controlnet_samples(model, without_effect(sliced))
    assert not torch.allclose(pruned_images, unsteered)


def controlnet_residuals(controlnet, seed: int = 5):
    """The ControlNet's down and mid residuals for one fixed input."""
    generator = torch.Generator().manual_seed(seed)
    sample, text = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 5, 64, generator=generator)
    condition = torch.rand(2, 3, 16, 16, generator=generator)
    with torch.no_grad():
        down, mid = controlnet(
            sample, torch.tensor([700, 30]), text, controlnet_cond=condition, return_dict=False
        )
    return sample, text, [*down, mid]


@pytest.mark.slow  # ~15 CPU-seconds per layout: two pipelines loaded, one sampled
@pytest.mark.parametrize("layout", ["free", "diffusers"])
def test_a_sliced_controlnet_loads_as_the_original_at_the_kept_channels(built, pruned, tmp_path, layout):  # noqa: F811
    """Through the Python API: dpcli.slice, then load_controlnet; the loaded ControlNet is the in-memory
    slice, its residuals are the original's at the pruned UNet's kept skip channels, and the pruned UNet
    and pipeline take them."""
    from diffusers import StableDiffusionControlNetPipeline

    from dpcli.slicing import load_controlnet, read_pruned, skip_sources, slice_controlnet

    original = dpcli.load(built["sd"])
    controlnet = controlnet_of(original.module)
    controlnet.save_pretrained(tmp_path / "controlnet")
    model = dpcli.load(pruned[layout])
    report = dpcli.slice(tmp_path / "controlnet", model, tmp_path / "sliced")
    assert report.kind == "controlnet" and report.params_after < report.params_before

    loaded = load_controlnet(tmp_path / "sliced")
    in_memory, _ = slice_controlnet(tmp_path / "controlnet", read_pruned(pruned[layout]))
    state = loaded.state_dict()
    assert set(state) == set(in_memory)
    assert all(torch.equal(state[key], in_memory[key]) for key in in_memory)

    kept = kept_of(pruned[layout])
    sources, mid = skip_sources(original.module.config, read_pruned(pruned[layout]).original)
    sample, text, full = controlnet_residuals(controlnet)
    _, _, sliced = controlnet_residuals(loaded)
    assert len(sliced) == len(full) == len(sources) + 1
    for source, whole, part in zip([*sources, mid], full, sliced, strict=True):
        channels = kept.get(source, {}).get("out", list(range(whole.shape[1])))
        assert part.shape == (2, len(channels), *whole.shape[2:]), source
        assert torch.allclose(part, whole[:, channels], atol=1e-6, rtol=0), source

    # the pruned UNet takes the residuals, and they change its output
    with torch.no_grad():
        steered = model.module(
            sample, torch.tensor([700, 30]), text,
            down_block_additional_residuals=sliced[:-1], mid_block_additional_residual=sliced[-1],
        ).sample  # fmt: skip
        plain = model.module(sample, torch.tensor([700, 30]), text).sample
    assert steered.shape == plain.shape == (2, 4, 8, 8) and not torch.allclose(steered, plain)

    # one line makes the ControlNet pipeline from the pruned model's pipeline; it samples
    pipe = StableDiffusionControlNetPipeline.from_pipe(model.pipeline(), controlnet=loaded)
    assert pipe.unet is model.module
    condition = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    images = pipe(
        "a red square", image=condition, height=16, width=16, num_inference_steps=2,
        generator=torch.Generator().manual_seed(0), output_type="pt",
    ).images  # fmt: skip
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()

    # bfloat16 on request
    assert {p.dtype for p in load_controlnet(tmp_path / "sliced", dtype=torch.bfloat16).parameters()} == {
        torch.bfloat16
    }


@pytest.mark.slow  # ~10-15 CPU-seconds: the plain pipeline loaded from disk and sampled twice
def test_a_sliced_controlnet_with_the_plain_diffusers_pipeline_of_a_diffusers_layout_model(
    dp,
    built,  # noqa: F811
    pruned,
    tmp_path,
):
    """A --layout diffusers model loads with diffusers alone; the sliced ControlNet needs load_controlnet
    (its trunk keeps the original widths, so no ControlNetModel config describes it), and plain
    ControlNetModel.from_pretrained refuses it instead of loading random weights."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from dpcli.slicing import load_controlnet

    controlnet = controlnet_of(dpcli.load(built["sd"]).module)
    controlnet.save_pretrained(tmp_path / "controlnet")
    out = tmp_path / "sliced"
    result = dp("slice", tmp_path / "controlnet", "--model", pruned["diffusers"], "-o", out)
    assert result.exit_code == 0, result.stderr
    with pytest.raises(ValueError, match="expected shape"):
        ControlNetModel.from_pretrained(out)

    loaded = load_controlnet(out)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        pruned["diffusers"], controlnet=loaded, safety_checker=None, requires_safety_checker=False
    )
    condition = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        images = pipe(
            ["a red square", "a blue circle"], image=condition, height=16, width=16, num_inference_steps=2,
            generator=torch.Generator().manual_seed(0), output_type="pt",
        ).images  # fmt: skip
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    # the same images as dp's own pipeline of the model with the same ControlNet
    with torch.no_grad():
        reference = StableDiffusionControlNetPipeline.from_pipe(
            dpcli.load(pruned["diffusers"]).pipeline(), controlnet=loaded
        )(
            ["a red square", "a blue circle"], image=condition, height=16, width=16, num_inference_steps=2,
            generator=torch.Generator().manual_seed(0), output_type="pt",
        ).images  # fmt: skip
    assert torch.allclose(images, reference, atol=1e-5)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "not a ControlNet folder"),
        ("unet folder", "not a ControlNetModel"),
        ("other weights", "do not fit its config"),
    ],
)
def test_load_controlnet_refuses_what_is_not_a_controlnet_with_one_clear_error(
    built,  # noqa: F811
    tmp_path,
    case,
    message,
):
    from dpcli.errors import BadInput
    from dpcli.slicing import load_controlnet

    folder = tmp_path / "nothing"
    if case == "unet folder":
        folder = built["sd"] / "unet"
    elif case == "other weights":
        controlnet_of(dpcli.load(built["sd"]).module).save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        config["block_out_channels"] = [16, 32]
        (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadInput, match=message):
        load_controlnet(folder)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("other model", "for another model"),
        ("wrong shape", "for another model"),
        ("not a lora", "not a LoRA layout"),
        ("text only", "no UNet LoRA entries"),
        ("not pruned", "not a dpcli model folder"),
        ("pipeline folder", "dp slice takes LoRA files and ControlNetModel folders"),
    ],
)
def test_bad_addons_exit_2_with_one_line_and_write_nothing(dp, built, pruned, tmp_path, case, message):  # noqa: F811
    lora = make_lora("peft")
    model = pruned["free"]
    source = tmp_path / "lora.safetensors"
    if case == "other model":
        lora["unet.down_blocks.7.attentions.0.proj_in.lora_A.weight"] = torch.zeros(4, 32)
        lora["unet.down_blocks.7.attentions.0.proj_in.lora_B.weight"] = torch.zeros(32, 4)
    elif case == "wrong shape":
        lora[f"unet.{LINEAR_TARGETS[0]}.lora_A.weight"] = torch.zeros(4, 48)
    elif case == "not a lora":
        lora[f"unet.{LINEAR_TARGETS[0]}.hada_w1_a"] = torch.zeros(4, 4)
    elif case == "text only":
        lora = {"text_encoder.layer.lora_A.weight": torch.zeros(4, 4)}
    elif case == "not pruned":
        model = built["sd"]
    if case == "pipeline folder":
        source = built["sd"] / "unet"
    else:
        save_file(lora, source)
    out = tmp_path / "never"
    result = dp("slice", source, "--model", model, "-o", out)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


def test_the_python_api_slices_onto_a_loaded_pruned_model(pruned, tmp_path):
    source = tmp_path / "lora.safetensors"
    save_file(make_lora("kohya"), source)
    report = dpcli.slice(source, dpcli.load(pruned["diffusers"]), tmp_path / "out").to_json()
    assert report["layout"] == "kohya" and report["modules_sliced"] >= len(LINEAR_TARGETS) - 1
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "slice.json").read_text())["params_after"] == report["params_after"]
