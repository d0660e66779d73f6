"""The ldm adapter: latent UNets with their autoencoder, text encoder or class labels.

Every model here is a tiny random-init build of the real diffusers / transformers classes (VQModel,
AutoencoderKL, UNet2DModel, UNet2DConditionModel, CLIPTextModel) with a byte-level CLIP tokenizer written
in tests/helpers (latent.py); CompVis single files are made from them by helpers/compvis.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers.compvis import (
    UNET_PREFIX,
    clip_to_compvis,
    compvis_checkpoint,
    open_clip_to_compvis,
    unet_to_compvis,
    vae_to_compvis,
)
from helpers.latent import (
    CROSS_WIDTH,
    TOKENS,
    byte_level_tokenizer,
    cross_attention_unet,
    kl_autoencoder,
    latent_unet2d,
    text_encoder,
    vq_autoencoder,
    write_pipeline,
)

from dpcli.adapters.base import ModelSource
from dpcli.errors import BadInput
from dpcli.loading import load_model
from dpcli.plugins import get_registry
from dpcli.testing import make_image_folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Pipelines and data shared by the tests of this module (built once)."""
    root = tmp_path_factory.mktemp("ldm")
    made = {"root": root}
    made["vq"] = write_pipeline(root / "vq-ldm", latent_unet2d(3), vq_autoencoder(), vae_key="vqvae")
    made["class"] = write_pipeline(root / "class-ldm", latent_unet2d(4, num_class_embeds=3), kl_autoencoder())
    images = make_image_folder(root / "images", count=6, size=20)
    (images / "captions.txt").write_text(
        "class0/img000.png\ta red square\nclass0/img002.png\ta blue circle\n"
    )
    (images / "class0" / "img004.txt").write_text("a green field")
    (images / "class1" / "metadata.jsonl").write_text(
        "".join(
            json.dumps({"file_name": f"img{i:03d}.png", "text": f"picture {i}"}) + "\n" for i in (1, 3, 5)
        )
    )
    made["images"] = images
    made["plain_images"] = make_image_folder(root / "plain", count=4, size=20)
    tokenizer = byte_level_tokenizer(root / "tokenizer-files")
    made["tokenizer"] = tokenizer
    made["sd"] = write_pipeline(
        root / "sd",
        cross_attention_unet(),
        kl_autoencoder(),
        text=text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
    )
    return made


def forward(loaded, batch: int = 2, seed: int = 3):
    """One prediction of ``loaded`` with its adapter, on fixed inputs of its own shapes."""
    adapter = get_registry().adapter(loaded.adapter_name)
    inputs = adapter.example_inputs(loaded, batch_size=batch)
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(inputs[0].shape, generator=generator)
    timesteps = torch.tensor([5, 700][:batch])
    with torch.no_grad():
        return adapter.predict(loaded, sample, timesteps, *inputs[2:])


# Detection ------------------------------------------------------------------------------------------
def test_latent_pipelines_go_to_ldm_and_pixel_ones_stay_with_ddpm(
    built, tiny_pipeline_folder, tiny_unet_folder
):
    registry = get_registry()
    ldm, ddpm = registry.adapter("ldm"), registry.adapter("ddpm")
    for name in ("vq", "class", "sd"):
        source = ModelSource(spec=name, kind="folder", path=built[name])
        assert ldm.detect(source) >= 0.9 and ddpm.detect(source) == 0.0, name
    for folder in (tiny_pipeline_folder, tiny_unet_folder):
        source = ModelSource(spec=str(folder), kind="folder", path=folder)
        assert ldm.detect(source) == 0.0 and ddpm.detect(source) > 0.5
    assert load_model(str(built["vq"])).adapter_name == "ldm"
    assert get_registry().usable("adapter")["ldm"].plugin.builtin


@pytest.mark.slow
def test_hub_id_of_a_latent_pipeline_through_the_local_cache(built, tmp_path):
    import shutil

    from dpcli.testing import run_dp_subprocess

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--example--tiny-ldm"
    shutil.copytree(built["vq"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = run_dp_subprocess("inspect", "example/tiny-ldm", "--json", env=env)
    assert result.exit_code == 0, result.stderr
    assert result.json["adapter"] == "ldm" and result.json["source_kind"] == "diffusers pipeline (Hub cache)"


# Inspect --------------------------------------------------------------------------------------------
def test_inspect_shows_latent_size_and_components(dp, built):
    result = dp("inspect", built["vq"], "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json
    assert report["adapter"] == "ldm" and report["class"] == "UNet2DModel"
    assert report["input_shape"] == [1, 3, 8, 8] and report["macs"] > 0
    assert [c["name"] for c in report["components"]] == ["vae"] and report["components"][0][
        "class"
    ] == "VQModel"
    assert any("16x16 images" in note for note in report["notes"])
    table = dp("inspect", built["vq"])
    assert "VQModel" in table.stdout and "down_blocks.1.attentions.0.to_q" in table.stdout


def test_inspect_text_pipeline_lists_autoencoder_and_text_encoder_separately(dp, built):
    report = dp("inspect", built["sd"], "--json").json
    components = {c["name"]: c for c in report["components"]}
    assert set(components) == {"vae", "text_encoder"}
    assert components["text_encoder"]["class"] == "CLIPTextModel" and components["text_encoder"]["params"] > 0
    unet_params = sum(p.numel() for p in cross_attention_unet().parameters())
    assert report["params"] == unet_params  # the UNet alone: the part that is pruned
    assert any("conditioning: text" in note for note in report["notes"])


# Scoring and pruning ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_text_pipeline_prunes_through_the_cli_into_a_loadable_pipeline_folder(dp, built, tmp_path):
    out = tmp_path / "pruned"
    result = dp(
        "prune", built["sd"], "--criterion", "diff-taylor", "--ratio", "0.5", "--head-ratio", "0.25",
        "--data", built["images"], "--calib-size", "4", "--timesteps", "6", "--threshold", "0.9",
        "-o", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = result.json
    assert report["params_after"] < report["params_before"] and report["macs_after"] < report["macs_before"]
    assert {p.name for p in out.iterdir()} >= {
        "dpcli.json",
        "unet",
        "scheduler",
        "vae",
        "text_encoder",
        "tokenizer",
    }
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt*"))
    metadata = json.loads((out / "dpcli.json").read_text())
    assert metadata["adapter"] == "ldm" and metadata["latent"]["conditioning"] == "text"

    pruned = load_model(str(out)).model
    block = pruned.down_blocks[0].attentions[0].transformer_blocks[0]
    assert block.attn2.to_k.in_features == CROSS_WIDTH and block.attn2.to_v.in_features == CROSS_WIDTH
    for attention in (block.attn1, block.attn2):
        assert attention.heads == 3 and attention.to_q.out_features % attention.heads == 0
    geglu, down = block.ff.net[0].proj, block.ff.net[2]
    assert geglu.out_features == 2 * down.in_features < 2 * 128
    assert pruned.conv_out.out_channels == 4 and pruned.conv_in.in_channels == 4

    inspected = dp("inspect", out, "--json").json
    assert inspected["pruned"]["criterion"] == "diff-taylor" and len(inspected["components"]) == 2
    again = dp("prune", out, "--criterion", "magnitude", "--ratio", "0.2", "-o", tmp_path / "twice")
    assert again.exit_code == 0, again.stderr


def test_pruned_text_model_reloads_with_identical_outputs(built, tmp_path):
    from dpcli.jobs.prune import PruneSettings, prune_model, pruned_metadata
    from dpcli.jobs.score import ScoreSettings, compute_scores
    from dpcli.pruning import PruneOptions

    loaded = load_model(str(built["sd"]))
    options = PruneOptions(head_ratio=0.25)
    settings = ScoreSettings(
        "diff-taylor", data=str(built["images"]), calib_size=3, timesteps=4, head_ratio=0.25
    )
    scores = compute_scores(loaded, settings)
    prune_settings = PruneSettings(ratio=0.4)
    report = prune_model(loaded, scores, prune_settings, options)
    loaded.adapter.save(loaded, tmp_path / "out", pruned_metadata(report, scores, prune_settings, options))
    reloaded = load_model(str(tmp_path / "out"))
    assert torch.equal(forward(loaded), forward(reloaded))
    adapter = loaded.adapter
    prompts = {"prompt": ["a cat", "a dog"]}
    first = adapter.sampling_conditioning(loaded, 2, **prompts)
    second = adapter.sampling_conditioning(reloaded, 2, **prompts)
    assert torch.equal(first["encoder_hidden_states"], second["encoder_hidden_states"])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(adapter.decode(loaded, latents), adapter.decode(reloaded, latents))


def test_calibration_prompt_captions_and_empty_prompt(built):
    from dpcli.scoring import calibration_batch

    loaded = load_model(str(built["sd"]))
    adapter = get_registry().adapter("ldm")
    latents, given = calibration_batch(loaded, adapter, str(built["images"]), 6, seed=0, prompt="a cat")
    assert latents.shape == (6, 4, 8, 8)
    states = given["encoder_hidden_states"]
    assert states.shape == (6, TOKENS, CROSS_WIDTH) and not states.requires_grad
    assert all(torch.equal(states[0], row) for row in states)
    _, captioned = calibration_batch(loaded, adapter, str(built["images"]), 6, seed=0)
    rows = captioned["encoder_hidden_states"]
    assert not torch.equal(rows[0], rows[1])  # six images, six different captions
    _, plain = calibration_batch(loaded, adapter, str(built["plain_images"]), 2, seed=0)
    empty = adapter.sampling_conditioning(loaded, 1, prompt="")["encoder_hidden_states"][0]
    assert torch.allclose(plain["encoder_hidden_states"][0], empty)


def test_captions_come_from_sidecars_metadata_and_captions_txt(built, tmp_path):
    import shutil

    from dpcli.data import open_source

    source = open_source(str(built["images"]))
    assert [source.caption(i) for i in range(len(source))] == [
        "a red square", "a blue circle", "a green field", "picture 1", "picture 3", "picture 5",
    ]  # fmt: skip
    source.check_captions()
    plain = open_source(str(built["plain_images"]))
    assert not plain.has_captions and plain.caption(0) is None
    mixed = shutil.copytree(built["images"], tmp_path / "mixed")
    shutil.copy(plain.path(0), mixed / "class0" / "uncaptioned.png")
    with pytest.raises(BadInput, match="no caption for .*uncaptioned.png"):
        open_source(str(mixed)).check_captions()


def test_prompt_is_refused_where_it_means_nothing(dp, built, tiny_unet_folder, tmp_path):
    for model in (tiny_unet_folder, built["vq"]):
        result = dp("score", model, "--data", built["images"], "--calib-size", "2", "--timesteps", "2",
                    "--prompt", "a cat")  # fmt: skip
        assert result.exit_code == 2 and "--prompt" in result.stderr and "Traceback" not in result.stderr


def test_class_conditional_labels_from_sub_folders_prune_and_reload(dp, built, tmp_path):
    from dpcli.scoring import calibration_batch

    loaded = load_model(str(built["class"]))
    assert loaded.extras["conditioning"] == "class" and loaded.extras["num_classes"] == 3
    _, conditioning = calibration_batch(
        loaded, get_registry().adapter("ldm"), str(built["images"]), 6, seed=0
    )
    chosen = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    # sorted files: class0/img000, img002, img004, then class1/img001, img003, img005
    assert conditioning["class_labels"].tolist() == [0 if i < 3 else 1 for i in chosen.tolist()]
    out = tmp_path / "pruned"
    result = dp(
        "prune", built["class"], "--criterion", "taylor", "--ratio", "0.5", "--data", built["images"],
        "--calib-size", "4", "--timesteps", "3", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    reloaded = load_model(str(out))
    embedding = reloaded.model.class_embedding
    assert (
        embedding.num_embeddings == 3
        and embedding.embedding_dim == reloaded.model.time_embedding.linear_2.out_features
    )
    assert embedding.embedding_dim < 128
    assert forward(reloaded).shape == (2, 4, 8, 8)
    flat = tmp_path / "flat"
    flat.mkdir()
    for image in sorted(built["plain_images"].rglob("*.png")):
        (flat / image.name).write_bytes(image.read_bytes())
    unlabeled = dp("score", built["class"], "--data", flat, "--calib-size", "2", "--timesteps", "2")
    assert unlabeled.exit_code == 2 and "sub-folder per class" in unlabeled.stderr
    too_many = dp(
        "score", built["class"], "--data", "builtin:digits", "--calib-size", "2", "--timesteps", "2"
    )
    assert too_many.exit_code == 2 and "class label 9" in too_many.stderr and "3 classes" in too_many.stderr


def test_vq_ldm_prunes_reloads_identically_and_keeps_its_autoencoder(dp, built, tmp_path):
    out = tmp_path / "pruned"
    result = dp(
        "prune", built["vq"], "--criterion", "diff-taylor", "--ratio", "0.4", "--data", built["plain_images"],
        "--calib-size", "2", "--timesteps", "4", "-o", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    original, reloaded = load_model(str(built["vq"])), load_model(str(out))
    assert result.json["params_after"] == sum(p.numel() for p in reloaded.model.parameters())
    autoencoder = reloaded.components["vae"]
    assert type(autoencoder).__name__ == "VQModel"
    own = original.components["vae"].state_dict()
    assert all(torch.equal(own[k], v) for k, v in autoencoder.state_dict().items())


def test_scoring_encodes_with_the_scaling_factor_and_keeps_encoders_frozen(built):
    from dpcli.adapters.base import BatchContext
    from dpcli.data import load_images

    loaded = load_model(str(built["class"]))
    adapter = get_registry().adapter("ldm")
    images = load_images(str(built["images"]), size=adapter.data_size(loaded), channels=3)
    assert images.shape[-1] == 16  # 8x8 latents, autoencoder factor 2
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    latents, _ = adapter.prepare_batch(loaded, images, BatchContext(labels=labels))
    vae = loaded.components["vae"]
    with torch.no_grad():
        expected = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    assert torch.allclose(latents, expected)
    assert not any(p.requires_grad for p in vae.parameters())


# Fine-tuning conditional models: captions and labels reach training, latents are cached ---------------
def expected_batches(data, steps: int, batch: int, flip: bool = False):
    from dpcli.data import ImageTransform, open_source, training_batches

    transform = ImageTransform(16, 3, flip=flip)
    return list(
        training_batches(open_source(str(data)), transform, seed=0, batch_size=batch, steps=steps, workers=0)
    )


@pytest.mark.slow
def test_text_finetune_encodes_the_captions_of_the_images_it_trains_on(dp, built, tmp_path, monkeypatch):
    from dpcli.adapters.latent import hooks

    seen = []
    encode = hooks.encode_prompts
    monkeypatch.setattr(
        hooks, "encode_prompts", lambda loaded, prompts: seen.append(list(prompts)) or encode(loaded, prompts)
    )
    result = dp("finetune", built["sd"], "--data", built["images"], "--steps", "3", "--batch-size", "2",
                "--caption-dropout", "0", "--workers", "0", "-o", tmp_path / "tuned", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert seen == [batch.captions for batch in expected_batches(built["images"], 3, 2)]
    assert all(caption.startswith(("a ", "picture ")) for batch in seen for caption in batch)
    assert result.json["caption_dropout"] == 0
    seen.clear()
    default = dp("finetune", built["sd"], "--data", built["images"], "--steps", "10", "--batch-size", "2",
                 "--workers", "0", "-o", tmp_path / "default", "--json")  # fmt: skip
    assert default.exit_code == 0 and default.json["caption_dropout"] == 0.1
    assert sum(caption == "" for batch in seen for caption in batch) < 10  # about 2 of 20 are dropped


def test_class_conditional_finetune_gives_the_unet_the_labels_of_the_class_folders(
    dp, built, tmp_path, monkeypatch
):
    from dpcli.adapters.latent.adapter import LatentDiffusionAdapter

    seen = []
    predict = LatentDiffusionAdapter.predict

    def spy(loaded, sample, timesteps, conditioning=None):
        seen.append(conditioning["class_labels"].tolist())
        return predict(loaded, sample, timesteps, conditioning)

    monkeypatch.setattr(LatentDiffusionAdapter, "predict", staticmethod(spy))
    result = dp("finetune", built["class"], "--data", built["images"], "--steps", "3", "--batch-size", "2",
                "--workers", "0", "-o", tmp_path / "tuned")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    expected = [batch.labels.tolist() for batch in expected_batches(built["images"], 3, 2)]
    assert seen[-3:] == expected and {0, 1} <= {label for batch in expected for label in batch}
    refused = dp("finetune", built["class"], "--data", built["images"], "--steps", "1", "--caption-dropout", "0.2",
                 "-o", tmp_path / "refused")  # fmt: skip
    assert refused.exit_code == 2 and "--caption-dropout applies to text-conditional models" in refused.stderr


def test_latent_cache_encodes_each_image_and_flip_once_across_runs(dp, built, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file

    from dpcli.adapters.latent.adapter import LatentDiffusionAdapter

    encoded = []
    encode = LatentDiffusionAdapter.encode_images

    def counted(loaded, images):
        encoded.append(len(images))
        return encode(loaded, images)

    monkeypatch.setattr(LatentDiffusionAdapter, "encode_images", staticmethod(counted))
    images = shutil.copytree(built["images"], tmp_path / "images")
    cache = tmp_path / "latents"

    def run(name, workers="0"):  # with workers, a batch decoded ahead may miss what the step before encodes
        encoded.clear()
        result = dp("finetune", built["class"], "--data", images, "--steps", "4", "--batch-size", "3", "--flip",
                    "--cache-latents", cache, "--workers", workers, "-o", tmp_path / name)  # fmt: skip
        assert result.exit_code == 0, result.stderr
        return sum(encoded), load_file(tmp_path / name / "unet" / "raw.safetensors")

    pairs = {
        (i, f)
        for b in expected_batches(images, 4, 3, flip=True)
        for i, f in zip(b.ids, b.flipped, strict=True)
    }
    first, first_weights = run("first")
    assert first == len(pairs) == len(list(cache.rglob("*.safetensors"))) < 12  # 12 samples, repeats hit
    second, second_weights = run("second", workers="1")
    assert second == 0
    assert all(torch.equal(first_weights[k], v) for k, v in second_weights.items())
    edited = images / "class0" / "img000.png"
    make_image_folder(tmp_path / "other", count=1, size=20, seed=5)
    shutil.copy(tmp_path / "other" / "class0" / "img000.png", edited)
    third, _ = run("third")
    assert third == len({f for i, f in pairs if i == "class0/img000.png"})  # only the edited image again
    random_crops = dp("finetune", built["class"], "--data", images, "--steps", "1", "--cache-latents", cache,
                      "--crop", "random", "-o", tmp_path / "bad")  # fmt: skip
    assert random_crops.exit_code == 2 and "--crop random" in random_crops.stderr


def test_latent_cache_is_refused_for_pixel_models(dp, tiny_unet_folder, image_folder, tmp_path):
    result = dp("finetune", tiny_unet_folder, "--data", image_folder, "--steps", "1", "--cache-latents",
                tmp_path / "cache", "-o", tmp_path / "out")  # fmt: skip
    assert result.exit_code == 2 and "no latents to cache" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# Sampling hooks --------------------------------------------------------------------------------------
def ddim_loop(loaded, batch: int, guidance: float = 1.0, steps: int = 3, **options):
    """What the sampler does with the hooks: noise -> DDIM steps through denoise -> decode."""
    from diffusers import DDIMScheduler

    adapter = get_registry().adapter("ldm")
    scheduler = DDIMScheduler.from_config(loaded.scheduler.config)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn((batch, *adapter.noise_shape(loaded)), generator=generator)
    conditioning = adapter.sampling_conditioning(loaded, batch, generator=generator, **options)
    with torch.no_grad():
        for t in scheduler.timesteps:
            prediction = adapter.denoise(loaded, sample, t, conditioning, guidance_scale=guidance)
            sample = scheduler.step(prediction, t, sample).prev_sample
    return adapter.decode(loaded, sample)


def test_sampling_hooks_give_images_of_the_pixel_size(built):
    unconditional = load_model(str(built["vq"]))
    images = ddim_loop(unconditional, 2)
    assert images.shape == (2, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    labelled = load_model(str(built["class"]))
    assert ddim_loop(labelled, 3, class_labels=[0, 1, 2]).shape == (3, 3, 16, 16)
    with pytest.raises(BadInput, match="guidance"):
        ddim_loop(labelled, 1, guidance=3.0)
    with pytest.raises(BadInput, match="out of range"):
        ddim_loop(labelled, 1, class_labels=5)


def test_text_sampling_with_classifier_free_guidance(built):
    loaded = load_model(str(built["sd"]))
    images = ddim_loop(loaded, 2, guidance=5.0, prompt="a red square")
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    adapter = get_registry().adapter("ldm")
    conditioning = adapter.sampling_conditioning(loaded, 2, prompt=["a", "b"], negative_prompt="c")
    sample, t = torch.randn(2, 4, 8, 8), torch.tensor(500)
    with torch.no_grad():
        guided = adapter.denoise(loaded, sample, t, conditioning, guidance_scale=4.0)
        positive = adapter.predict(
            loaded, sample, t, {"encoder_hidden_states": conditioning["encoder_hidden_states"]}
        )
        negative = adapter.predict(
            loaded, sample, t, {"encoder_hidden_states": conditioning["negative_encoder_hidden_states"]}
        )
    assert torch.allclose(guided, negative + 4.0 * (positive - negative), atol=1e-5)


def test_compvis_key_mapping_round_trips_both_ways():
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet = cross_attention_unet(groups=32, layers_per_block=2)
    config = dict(unet.config)
    original = unet.state_dict()
    keys = unet_to_compvis(original, config)
    prefix = UNET_PREFIX
    for name in (
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",  # CrossAttnDownBlock2D
        "input_blocks.3.0.op.weight",  # its downsampler
        "input_blocks.4.0.skip_connection.weight",  # 32 -> 64 channels
        "middle_block.1.proj_in.weight",
        "output_blocks.2.1.conv.weight",  # UpBlock2D's upsampler (no attention)
        "output_blocks.5.1.transformer_blocks.0.ff.net.0.proj.weight",
        "time_embed.2.weight",
        "out.2.weight",
    ):
        assert prefix + name in keys, name
    back = convert_ldm_unet_checkpoint(keys, config)
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)

    for vae in (kl_autoencoder(groups=32, widths=(32, 64)), vq_autoencoder(groups=32, widths=(32, 64))):
        weights = vae.state_dict()
        keys = vae_to_compvis(weights, vae.config)
        assert keys["first_stage_model.encoder.mid.attn_1.q.weight"].dim() == 4
        assert "first_stage_model.decoder.up.1.upsample.conv.weight" in keys
        back = convert_ldm_vae_checkpoint(keys, dict(vae.config))
        if "quantize.embedding.weight" in weights:
            assert "first_stage_model.quantize.embedding.weight" in keys
            back["quantize.embedding.weight"] = keys["first_stage_model.quantize.embedding.weight"]
        assert back.keys() == weights.keys() and all(torch.equal(back[k], weights[k]) for k in weights)


@pytest.mark.parametrize("kind", ["clip", "open_clip"])
def test_compvis_text_encoder_mapping_round_trips(kind):
    from dpcli.adapters import compvis

    text = text_encoder(300, act="quick_gelu" if kind == "clip" else "gelu")
    to_compvis = clip_to_compvis if kind == "clip" else open_clip_to_compvis
    keys = to_compvis(text.state_dict())
    original = {"model": {"params": {"cond_stage_config": {"params": {"layer": "last"}}}}}
    back = compvis.text_encoder_from_compvis(keys, kind, original, CROSS_WIDTH)
    own = {k.removeprefix("text_model."): v for k, v in text.state_dict().items()}
    back = {k.removeprefix("text_model."): v for k, v in back.items() if not k.endswith("position_ids")}
    back.pop("text_projection.weight", None)
    assert back.keys() == own.keys() and all(torch.equal(back[k], own[k]) for k in own)


def test_compvis_stable_diffusion_checkpoint_loads_identically_and_inspects(dp, tmp_path):
    path, parts = compvis_checkpoint(tmp_path / "sd1", "clip")
    result = dp("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json
    assert report["adapter"] == "ldm" and report["source_kind"] == "single file, CompVis layout"
    assert report["input_shape"] == [1, 4, 8, 8] and report["macs"] > 0
    sizes = {c["name"]: c["params"] for c in report["components"]}
    assert sizes == {
        name: sum(p.numel() for p in parts[name].parameters()) for name in ("vae", "text_encoder")
    }
    assert any(
        row["name"] == "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
        for row in report["layers"]
    )
    assert get_registry().adapter("ddpm").detect(ModelSource(spec=str(path), kind="file", path=path)) == 0.0

    loaded = load_model(str(path))
    assert (
        loaded.scheduler.config.prediction_type == "epsilon"
        and loaded.scheduler.config.beta_schedule == "scaled_linear"
    )
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, TOKENS, CROSS_WIDTH)
    tokens = torch.tensor([[512, 70, 513, 513, 513, 513, 513, 513]])
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(
            loaded.model(sample, 10, context).sample, parts["unet"](sample, 10, context).sample
        )
        assert torch.equal(loaded.components["text_encoder"](tokens)[0], parts["text_encoder"](tokens)[0])
        assert torch.equal(
            loaded.components["vae"].decode(latents).sample, parts["vae"].decode(latents).sample
        )


def test_compvis_sd2_layout_with_v_prediction_scores_with_a_prompt(dp, tmp_path, built):
    path, parts = compvis_checkpoint(
        tmp_path / "sd2", "open_clip", suffix=".safetensors", parameterization="v"
    )
    loaded = load_model(str(path))
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    tokens = torch.tensor([[512, 70, 71, 513, 513, 513, 513, 513]])
    with torch.no_grad():  # the penultimate OpenCLIP layer is the text encoder's last
        assert torch.equal(loaded.components["text_encoder"](tokens)[0], parts["text_encoder"](tokens)[0])
    result = dp("score", path, "--data", built["plain_images"], "--calib-size", "2", "--timesteps", "3",
                "--prompt", "a cat", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert len(result.json["losses"]) == 3


def test_compvis_class_conditional_ldm_with_vq_first_stage(tmp_path):
    path, parts = compvis_checkpoint(tmp_path / "cin", "class", linear_start=0.0015, linear_end=0.0195)
    loaded = load_model(str(path))
    assert loaded.extras["conditioning"] == "class-context"
    assert loaded.extras["num_classes"] == 4 and loaded.extras["null_class"] == 4
    assert type(loaded.components["vae"]).__name__ == "VQModel" and loaded.extras["scaling_factor"] == 1.0
    assert torch.equal(loaded.components["class_embedder"].weight, parts["class_embedder"].weight)
    images = ddim_loop(loaded, 2, guidance=2.0, class_labels=[1, 3])
    assert images.shape == (2, 3, 16, 16)


def test_compvis_checkpoint_needs_its_yaml(dp, tmp_path):
    path, _ = compvis_checkpoint(tmp_path / "noyaml", "class")
    (path.parent / "config.yaml").rename(tmp_path / "elsewhere.yaml")
    result = dp("inspect", path)
    assert result.exit_code == 2 and "config.yaml" in result.stderr and "--config" in result.stderr
    assert dp("inspect", path, "--config", tmp_path / "elsewhere.yaml").exit_code == 0


# What is not supported says so ----------------------------------------------------------------------
def test_unsupported_latent_models_are_clear_bad_input(dp, tmp_path):
    unet = cross_attention_unet(in_channels=9)  # inpainting: latents + mask + masked-image latents
    inpainting = write_pipeline(tmp_path / "inpaint", unet, kl_autoencoder())
    result = dp("inspect", inpainting)
    assert result.exit_code == 2 and "takes 9 channels" in result.stderr and "Traceback" not in result.stderr
    index = json.loads((inpainting / "model_index.json").read_text())
    (inpainting / "model_index.json").write_text(
        json.dumps({**index, "text_encoder_2": ["transformers", "X"]})
    )
    result = dp("inspect", inpainting)
    assert result.exit_code == 2 and "SDXL refiner" in result.stderr and "Traceback" not in result.stderr
    forced = dp("inspect", inpainting / "unet" / "diffusion_pytorch_model.safetensors", "--adapter", "ldm")
    assert forced.exit_code == 2 and "not a CompVis latent-diffusion checkpoint" in forced.stderr
