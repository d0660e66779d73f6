"""SDXL through the ldm adapter: two text encoders, added text_time conditioning, end to end.

The pipeline is diffusers' own tiny SDXL test config (tests/pipelines/stable_diffusion_xl: two CLIP text
encoders of width 32, the second with a 32-wide projection, addition_time_embed_dim 8, 80-wide added
conditioning, transformer_layers_per_block (1, 2), linear projections), with the UNet widened from 2/4 to
32/64 channels so there is something to prune, and test_ldm's offline byte-level CLIP tokenizer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder

pytest.importorskip("transformers")

from helpers.latent import byte_level_tokenizer, kl_autoencoder  # noqa: E402

SDXL_BASE_PARAMS = 2_567_463_684


def sdxl_unet(seed: int = 0, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = {
        "block_out_channels": (32, 64),
        "layers_per_block": 2,
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "transformer_layers_per_block": (1, 2),
        "projection_class_embeddings_input_dim": 80,  # 6 * 8 + 32
        "cross_attention_dim": 64,
        "norm_num_groups": 8,
        **overrides,
    }
    return UNet2DConditionModel(**config).eval()


def sdxl_text_encoders(vocab: int, tokens: int = 8, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=vocab,
        hidden_act="gelu",
        projection_dim=32,
        max_position_embeddings=tokens,
    )
    torch.manual_seed(seed)
    first = CLIPTextModel(config).eval()
    torch.manual_seed(seed + 1)
    second = CLIPTextModelWithProjection(config).eval()
    return first, second


def write_sdxl_pipeline(folder: Path, tokenizer_files: Path, unet=None, refiner: bool = False) -> Path:
    """A StableDiffusionXLPipeline folder saved component by component, as diffusers writes one."""
    from diffusers import EulerDiscreteScheduler

    tokenizer = byte_level_tokenizer(tokenizer_files)
    first, second = sdxl_text_encoders(len(tokenizer))
    parts = {
        "unet": unet if unet is not None else sdxl_unet(),
        "vae": kl_autoencoder(),
        "text_encoder": None if refiner else first,
        "tokenizer": None if refiner else tokenizer,
        "text_encoder_2": second,
        "tokenizer_2": tokenizer,
    }
    index = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": True,
    }
    if refiner:
        index["requires_aesthetics_score"] = True
    for name, component in parts.items():
        if component is None:
            index[name] = [None, None]
            continue
        component.save_pretrained(folder / name)
        library = "transformers" if type(component).__module__.startswith("transformers") else "diffusers"
        index[name] = [library, type(component).__name__]
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading"
    )
    scheduler.save_config(folder / "scheduler")
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    made = {"root": root, "pipeline": write_sdxl_pipeline(root / "pipeline", root / "tokenizer-files")}
    images = make_image_folder(root / "images", count=6, size=20)
    made["images"] = images
    return made


# config:sdxl-base-1.0 -------------------------------------------------------------------------------------


def test_builtin_sdxl_base_config_is_the_real_unet():
    """The shipped config builds (on the meta device: no memory) into SDXL base's 2,567,463,684 parameters."""
    from diffusers import UNet2DConditionModel

    from dpcli.adapters.unet2d import CONFIGS

    config = json.loads((CONFIGS / "sdxl-base-1.0.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    assert sum(p.numel() for p in unet.parameters()) == SDXL_BASE_PARAMS
    assert unet.add_embedding.linear_1.in_features == 2816


def test_builtin_sdxl_config_goes_to_the_ldm_adapter():
    from dpcli.loading import choose_adapter, resolve_source

    assert choose_adapter(resolve_source("config:sdxl-base-1.0")).name == "ldm"
    assert choose_adapter(resolve_source("config:ddpm-cifar10-32")).name == "ddpm"


def test_inspect_sdxl_unet_config_counts_params_and_macs(dp, tmp_path):
    unet = sdxl_unet()
    unet.save_config(tmp_path)
    config = tmp_path / "config.json"
    report = dp("inspect", config, "--json").json
    assert report["adapter"] == "ldm"
    assert report["params"] == sum(p.numel() for p in unet.parameters())
    assert report["macs"] > 0
    assert any("SDXL" in note for note in report["notes"])
    names = {row["name"] for row in report["layers"]}
    assert {"add_embedding.linear_1", "add_embedding.linear_2"} <= names


# Loading ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sdxl_pipeline_from_the_hub_cache_and_its_bare_unet_folder(sdxl, tmp_path):
    import shutil

    from dpcli.testing import run_dp_subprocess

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--example--tiny-sdxl"
    shutil.copytree(sdxl["pipeline"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = run_dp_subprocess("inspect", "example/tiny-sdxl", "--json", env=env)
    assert result.exit_code == 0, result.stderr
    report = result.json
    assert report["adapter"] == "ldm" and report["source_kind"] == "diffusers pipeline (Hub cache)"
    assert [c["name"] for c in report["components"]] == ["vae", "text_encoder", "text_encoder_2"]
    assert report["components"][2]["class"] == "CLIPTextModelWithProjection"
    assert any("SDXL" in note and "time ids" in note for note in report["notes"])
    bare = run_dp_subprocess("inspect", sdxl["pipeline"] / "unet", "--json")
    assert bare.exit_code == 0, bare.stderr
    assert bare.json["params"] == report["params"] and bare.json["source_kind"].startswith(
        "diffusers UNet folder"
    )
    assert any("SDXL" in note and "no text encoders" in note for note in bare.json["notes"])


def test_sdxl_refiner_is_refused_in_one_line(dp, tmp_path):
    folder = write_sdxl_pipeline(tmp_path / "refiner", tmp_path / "tokenizer-files", refiner=True)
    result = dp("inspect", folder)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "SDXL refiner" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# Conditioning -----------------------------------------------------------------------------------------------


def test_time_ids_are_each_images_original_size_crop_and_target(sdxl, tmp_path):
    """As diffusers' train_text_to_image_sdxl.py: (original h, w, crop top, left, target h, w)."""
    from PIL import Image

    from dpcli.adapters.base import BatchContext
    from dpcli.data.transforms import ImageTransform
    from dpcli.loading import load_model

    loaded = load_model(str(sdxl["pipeline"]))
    transform = ImageTransform(16, 3)
    tall, wide = Image.new("RGB", (20, 40)), Image.new("RGB", (50, 20))  # PIL sizes are (width, height)
    pixels, geometry = [], []
    for image, flip in ((tall, False), (wide, False), (wide, True)):
        tensor, _, place = transform.apply(image, flip=flip)
        pixels.append(tensor)
        geometry.append(place)
    context = BatchContext(captions=["a", "b", "c"], geometry=geometry)
    _, conditioning = loaded.adapter.prepare_batch(loaded, torch.stack(pixels), context)
    # tall: 20x40 -> 16x32, centre crop from row 8; wide: 50x20 -> 40x16, centre crop from column 12
    # (flipped: the crop of the flipped image starts at 40 - 16 - 12 = 12 too; an odd margin would differ)
    expected = [[40, 20, 8, 0, 16, 16], [20, 50, 0, 12, 16, 16], [20, 50, 0, 12, 16, 16]]
    assert conditioning["time_ids"].tolist() == expected
    assert conditioning["text_embeds"].shape == (3, 32)
    assert conditioning["encoder_hidden_states"].shape == (3, 8, 64)
    # --cache-latents: the pair of each caption is kept on disk and read back instead of encoding again
    from dpcli.adapters.latent import sdxl as sdxl_module

    cached = BatchContext(captions=["a", "", "a"], geometry=geometry, text_cache=tmp_path / "cache")
    _, first = loaded.adapter.prepare_batch(loaded, torch.stack(pixels), cached)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2
    encode = sdxl_module._encode
    sdxl_module._encode = lambda *_: pytest.fail("encoded again despite the text cache")
    try:
        _, again = loaded.adapter.prepare_batch(loaded, torch.stack(pixels), cached)
    finally:
        sdxl_module._encode = encode
    assert all(torch.equal(first[key], again[key]) for key in first)
    # a dropped caption is the empty prompt, encoded by both encoders (not the zeros of sampling)
    empty = loaded.adapter.sampling_conditioning(loaded, 1, prompt="")
    assert torch.allclose(first["encoder_hidden_states"][1], empty["encoder_hidden_states"][0], atol=1e-6)
    assert torch.allclose(first["text_embeds"][1], empty["text_embeds"][0], atol=1e-6)
    assert first["text_embeds"][1].abs().sum() > 0
    random_crop = ImageTransform(16, 3, crop="random")
    _, _, place = random_crop.apply(wide, torch.Generator().manual_seed(0), flip=True)
    unflipped_left = 40 - 16 - place.crop_top_left[1]
    assert 0 <= unflipped_left <= 24 and place.original_size == (20, 50)


def test_sdxl_conditioning_is_both_encoders_as_diffusers_encodes_it(sdxl):
    from diffusers import StableDiffusionXLPipeline

    import dpcli

    model = dpcli.load(sdxl["pipeline"])
    loaded = model.loaded
    conditioning = loaded.adapter.sampling_conditioning(
        loaded, 2, prompt=["a red square", "a cat"], negative_prompt="blurry"
    )
    pipe = model.pipeline()
    assert isinstance(pipe, StableDiffusionXLPipeline)
    hidden, negative, pooled, negative_pooled = pipe.encode_prompt(
        ["a red square", "a cat"], negative_prompt=["blurry"] * 2, device="cpu"
    )
    # dp encodes each distinct prompt once (batch 1 for "blurry"), the pipeline every row: float rounding
    same = {"atol": 1e-5, "rtol": 1e-5}
    assert torch.allclose(conditioning["encoder_hidden_states"], hidden, **same)
    assert torch.allclose(conditioning["text_embeds"], pooled, **same)
    assert torch.allclose(conditioning["negative_encoder_hidden_states"], negative, **same)
    assert torch.allclose(conditioning["negative_text_embeds"], negative_pooled, **same)
    assert conditioning["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2
    unprompted = loaded.adapter.sampling_conditioning(loaded, 1)
    assert not unprompted["negative_text_embeds"].any()  # force_zeros_for_empty_prompt, as the pipeline


# End to end through the CLI ---------------------------------------------------------------------------------


def _state(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.slow
def test_sdxl_end_to_end_inspect_prune_finetune_eval_pipeline_export(dp, sdxl, tmp_path):
    import shutil

    import numpy as np
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file
    from test_eval_conditional import tiny_clip

    import dpcli
    from dpcli.io.weights import load_tensor_file
    from dpcli.loading import load_model

    pipeline, images = sdxl["pipeline"], sdxl["images"]
    files = sorted(p.relative_to(images) for p in images.rglob("*.png"))
    (images / "captions.txt").write_text("".join(f"{f}\ta red square {i}\n" for i, f in enumerate(files)))
    others = tmp_path / "other-captions"
    shutil.copytree(images, others)
    (others / "captions.txt").write_text("".join(f"{f}\ta blue circle {i}\n" for i, f in enumerate(files)))

    inspected = dp("inspect", pipeline, "--json")
    assert inspected.exit_code == 0, inspected.stderr
    assert inspected.json["adapter"] == "ldm"

    pruned = tmp_path / "pruned"
    result = dp("prune", pipeline, "--criterion", "diff-taylor", "--target-macs", "0.6", "--head-ratio", "0.25",
                "--data", images, "--calib-size", "4", "--timesteps", "4", "-o", pruned, "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert abs(result.json["macs_fraction"] - 0.6) < 0.03
    original, small = load_model(str(pipeline)), load_model(str(pruned))
    for name in ("vae", "text_encoder", "text_encoder_2"):
        before, after = _state(original.components[name]), _state(small.components[name])
        assert before.keys() == after.keys(), name
        assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    unet = small.model
    assert unet.add_embedding.linear_1.in_features == 80  # text_embeds + 6 time ids: never pruned
    assert unet.time_embedding.linear_2.out_features == unet.add_embedding.linear_2.out_features < 128
    assert unet.conv_in.out_channels < 32

    tuned = {}
    for name, data in (("red", images), ("blue", others)):
        out = tmp_path / name
        result = dp("finetune", pruned, "--data", data, "--steps", "2", "--batch-size", "2", "--caption-dropout",
                    "0", "--workers", "0", "--cache-latents", tmp_path / f"cache-{name}", "-o", out)  # fmt: skip
        assert result.exit_code == 0, result.stderr
        tuned[name] = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(tuned["red"][k], tuned["blue"][k]) for k in tuned["red"])
    text_cache = [p for p in (tmp_path / "cache-red").iterdir() if p.name.startswith("text-")]
    assert len(text_cache) == 1 and len(list(text_cache[0].rglob("*.safetensors"))) == 4  # 4 captions seen

    clip = tiny_clip(tmp_path / "clip")
    evaluated = tmp_path / "eval"
    result = dp("eval", tmp_path / "red", "--steps", "3", "--num-samples", "2", "--batch-size", "2", "--no-latency",
                "--prompt", "a red square", "--prompt", "a blue circle", "--negative-prompt", "blurry",
                "--clip-model", clip, "-o", evaluated, "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.json["protocol"]["guidance_scale"] == 5.0 and result.json["clip_score"] is not None
    expected = load_tensor_file(evaluated / "samples.safetensors")["images"].permute(0, 2, 3, 1).numpy()

    pipe = dpcli.load(tmp_path / "red").pipeline()
    assert isinstance(pipe, StableDiffusionXLPipeline) and pipe.unet.conv_in.out_channels < 32
    sampled = pipe(
        prompt=["a red square", "a blue circle"],
        negative_prompt=["blurry"] * 2,
        generator=dpcli.noise_generators(2),
        num_inference_steps=3,
        output_type="np",
    ).images
    got = (np.asarray(sampled) * 255).round().clip(0, 255).astype(np.uint8)
    assert got.shape == expected.shape and np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    card = (tmp_path / "red" / "README.md").read_text()
    assert "SDXL" in card and "StableDiffusionXLPipeline" in card

    result = dp("export", tmp_path / "red", "-o", tmp_path / "unet.onnx", "--json")
    assert result.exit_code == 0, result.stderr
    names = [entry["name"] for entry in result.json["inputs"]]
    assert names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert result.json["max_abs_diff"] <= result.json["tolerance"]


# SGM single files -------------------------------------------------------------------------------------------


def write_sgm_checkpoint(pipeline: Path, path: Path) -> Path:
    """The tiny pipeline as one safetensors file in Stability's original SDXL (SGM) key layout."""
    from helpers import compvis
    from safetensors.torch import save_file

    from dpcli.adapters.compvis import OPEN_CLIP_PREFIX
    from dpcli.loading import load_model

    loaded = load_model(str(pipeline))
    unet = loaded.model.state_dict()
    added = {k: unet.pop(k) for k in list(unet) if k.startswith("add_embedding.")}
    tensors = compvis.unet_to_compvis(unet, loaded.model.config)
    for key, tensor in added.items():
        layer, kind = key.split(".")[1:]
        tensors[f"model.diffusion_model.label_emb.0.{0 if layer == 'linear_1' else 2}.{kind}"] = tensor
    vae = loaded.components["vae"]
    tensors.update(compvis.vae_to_compvis(vae.state_dict(), vae.config))
    first = loaded.components["text_encoder"].state_dict()
    prefix = "conditioner.embedders.0.transformer.text_model."  # CLIP-L under transformers' names
    tensors.update({prefix + k.removeprefix("text_model."): v for k, v in first.items()})
    second = loaded.components["text_encoder_2"]
    open_clip = compvis.open_clip_to_compvis(second.text_model.state_dict())
    for key, tensor in open_clip.items():
        tensors["conditioner.embedders.1.model." + key.removeprefix(OPEN_CLIP_PREFIX)] = tensor
    tensors["conditioner.embedders.1.model.text_projection"] = second.text_projection.weight.T.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    for name in ("tokenizer", "tokenizer_2"):
        loaded.components[name].save_pretrained(str(path.parent / name))
    return path


def test_sgm_single_file_converts_offline_to_the_same_model(dp, sdxl, tmp_path):
    """An SDXL checkpoint in the original key layout, converted with diffusers' single-file functions
    against local configs (--config: a pipeline-layout folder; no network), predicts as the pipeline."""
    import shutil

    from dpcli.loading import load_model

    checkpoint = write_sgm_checkpoint(sdxl["pipeline"], tmp_path / "sgm" / "tiny-sdxl.safetensors")
    configs = tmp_path / "configs"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        (configs / name).mkdir(parents=True)
        for file in (sdxl["pipeline"] / name).glob("*.json"):
            shutil.copy(file, configs / name / file.name)
    result = dp("inspect", checkpoint, "--config", configs, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json["source_kind"] == "single file, SGM (SDXL) layout"
    converted, original = load_model(str(checkpoint), config=configs), load_model(str(sdxl["pipeline"]))
    for name in ("vae", "text_encoder", "text_encoder_2"):
        before, after = _state(original.components[name]), _state(converted.components[name])
        assert all(torch.equal(before[k], after[k]) for k in before), name
    assert all(
        torch.equal(v, converted.model.state_dict()[k]) for k, v in original.model.state_dict().items()
    )
    adapter = original.adapter
    ours = adapter.sampling_conditioning(converted, 1, prompt="a cat")
    theirs = adapter.sampling_conditioning(original, 1, prompt="a cat")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    shipped = dp("inspect", checkpoint)  # the shipped SDXL base configs do not fit a tiny checkpoint
    assert shipped.exit_code == 2 and "Traceback" not in shipped.stderr


# --weights-dtype: bf16 without a float32 build ----------------------------------------------------------


@pytest.fixture
def parameter_dtypes(monkeypatch):
    """The (dtype, numel) of every parameter a module registers off the meta device while the test runs."""
    made: list[tuple[torch.dtype, int]] = []
    register = torch.nn.Module.register_parameter

    def spy(module, name, parameter):
        if parameter is not None and not parameter.is_meta:
            made.append((parameter.dtype, parameter.numel()))
        return register(module, name, parameter)

    monkeypatch.setattr(torch.nn.Module, "register_parameter", spy)
    return made


def _float32_elements(made) -> int:
    return sum(count for dtype, count in made if dtype == torch.float32)


def test_bf16_load_never_makes_a_float32_parameter(sdxl, tmp_path, parameter_dtypes):
    """Pipeline folder (UNet, VAE, both text encoders) and a config built with random weights: in bf16,
    no float32 parameter is ever allocated, and everything ends in bf16. In fp32 the same spy sees them."""
    import dpcli

    config = tmp_path / "unet.json"
    unet = sdxl_unet()
    config.write_text(json.dumps({**dict(unet.config), "_class_name": "UNet2DConditionModel"}))
    parameter_dtypes.clear()
    for spec in (sdxl["pipeline"], config):
        model = dpcli.load(spec, weights_dtype="bf16")
        modules = [model.loaded.model, *model.loaded.components.values()]
        dtypes = {p.dtype for m in modules if isinstance(m, torch.nn.Module) for p in m.parameters()}
        assert dtypes == {torch.bfloat16}, spec
    assert parameter_dtypes and _float32_elements(parameter_dtypes) == 0
    dpcli.load(sdxl["pipeline"])  # the default: float32, which the spy sees
    assert _float32_elements(parameter_dtypes) > sum(p.numel() for p in unet.parameters())


@pytest.mark.slow
def test_score_and_prune_bf16_weights_cli(dp, sdxl, tmp_path):
    """dp score --weights-dtype bf16 --precision bf16 --gradient-checkpointing scores the tiny SDXL; a bf16
    model with an fp32 scan, or an unknown dtype, is one line and exit 2; dp prune --weights-dtype bf16
    writes bf16 weights."""
    pipeline, data = sdxl["pipeline"], sdxl["images"]
    common = ("--data", data, "--calib-size", "2", "--timesteps", "2")
    result = dp(
        "score",
        pipeline,
        *common,
        "--weights-dtype",
        "bf16",
        "--precision",
        "bf16",
        "--gradient-checkpointing",
        "-o",
        tmp_path / "s.safetensors",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    assert result.json["precision"] == "bf16" and (tmp_path / "s.safetensors").is_file()
    layers = result.json["layers"]
    assert layers and all(math.isfinite(row["mean"]) for row in layers) and max(r["max"] for r in layers) > 0
    result = dp("score", pipeline, *common, "--weights-dtype", "bf16")
    assert result.exit_code == 2
    error = result.stderr.strip()
    assert "--precision" in error and "bf16" in error and len(error.splitlines()) == 1, error
    result = dp("score", pipeline, *common, "--weights-dtype", "fp8")
    assert result.exit_code == 2 and "--weights-dtype" in result.stderr
    result = dp(
        "prune",
        pipeline,
        "--criterion",
        "magnitude",
        "--ratio",
        "0.3",
        "--weights-dtype",
        "bf16",
        "-o",
        tmp_path / "pruned",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    assert result.json["params_after"] < result.json["params_before"]
    from safetensors import safe_open

    for weights in ("unet/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"):
        with safe_open(str(tmp_path / "pruned" / weights), "pt") as stored:
            assert {stored.get_tensor(key).dtype for key in stored.keys()} == {torch.bfloat16}, weights
