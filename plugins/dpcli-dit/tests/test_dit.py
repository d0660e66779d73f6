"""The dit adapter through dp: inspect, score, prune, safe save/reload, sampling hooks; pixel and latent."""

import json
import subprocess
import sys
from importlib import metadata

import pytest
import torch
from dpcli_dit import plugin

from dpcli.errors import BadInput
from dpcli.testing import make_image_folder, plugins_loaded, run_dp, run_dp_subprocess

# Pixel space, 16x16 RGB in 2x2 patches, 4 heads of 8, 10 classes, learned sigma (6 output channels).
TINY_DIT = {
    "num_attention_heads": 4,
    "attention_head_dim": 8,
    "in_channels": 3,
    "out_channels": 6,
    "num_layers": 2,
    "sample_size": 16,
    "patch_size": 2,
    "num_embeds_ada_norm": 10,
}
TINY_VAE = {
    "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 4,
    "norm_num_groups": 4,
    "layers_per_block": 1,
    "sample_size": 16,
}


def make_dit(config=None, seed=0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(**(config or TINY_DIT)).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    root = tmp_path_factory.mktemp("dit")
    make_dit().save_pretrained(root / "dit")
    torch.manual_seed(1)
    vae = AutoencoderKL(**TINY_VAE).eval()
    latent = make_dit({**TINY_DIT, "in_channels": 4, "out_channels": 8, "sample_size": 8})
    DiTPipeline(transformer=latent, vae=vae, scheduler=DDIMScheduler()).save_pretrained(root / "pipeline")
    return {
        "root": root,
        "dit": root / "dit",
        "pipeline": root / "pipeline",
        "data": make_image_folder(root / "images", count=4, size=16),
    }


def dit(*args):
    return run_dp(*args, plugins=[plugin])


def scan(files, *extra):
    return ["--data", files["data"], "--calib-size", "2", "--timesteps", "3", *extra]


def test_without_the_plugin_no_adapter_recognises_a_dit(files):
    result = run_dp("inspect", files["dit"])
    assert result.exit_code == 2 and "no adapter recognises" in result.stderr


def test_inspect_shows_heads_and_mlp_widths(files):
    report = dit("inspect", files["dit"], "--json").json
    assert report["adapter"] == "dit" and report["class"] == "DiTTransformer2DModel"
    assert report["input_shape"] == [1, 3, 16, 16] and report["macs"] > 0
    layers = {row["name"]: row for row in report["layers"]}
    assert layers["transformer_blocks.0.attn1"]["heads"] == 4
    assert layers["transformer_blocks.0.ff.net.0.proj"]["out_channels"] == 128


def test_older_transformer2d_dit_configs_are_recognised(files, tmp_path):
    folder = tmp_path / "legacy"
    make_dit().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(_class_name="Transformer2DModel", norm_type="ada_norm_zero", cross_attention_dim=None)
    (folder / "config.json").write_text(json.dumps(config))
    report = dit("inspect", folder, "--json").json
    assert (
        report["adapter"] == "dit"
        and report["params"] == dit("inspect", files["dit"], "--json").json["params"]
    )


def test_prune_shrinks_heads_and_mlp_but_not_the_residual_width(files):
    out = files["root"] / "pruned"
    result = dit(
        "prune",
        files["dit"],
        "--criterion",
        "diff-taylor",
        "--ratio",
        "0.5",
        "--head-ratio",
        "0.5",
        *scan(files),
        "-o",
        out,
        "--yes",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    assert result.json["macs_after"] < 0.6 * result.json["macs_before"]
    layers = {row["name"]: row for row in dit("inspect", out, "--json").json["layers"]}
    assert layers["transformer_blocks.0.attn1"]["heads"] == 2
    assert layers["transformer_blocks.0.ff.net.0.proj"]["out_channels"] == 64
    for residual in (
        "pos_embed.proj",
        "transformer_blocks.0.attn1.to_out.0",
        "transformer_blocks.1.ff.net.2",
    ):
        assert layers[residual]["out_channels"] == 32, residual
    assert layers["proj_out_2"]["out_channels"] == 24  # 2x2 patches × 6 channels (noise and sigma)
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt*"))


def test_reloaded_pruned_dit_gives_identical_outputs(files, tmp_path):
    from dpcli.jobs.prune import PruneSettings, prune_model, pruned_metadata
    from dpcli.jobs.score import ScoreSettings, compute_scores
    from dpcli.loading import load_model
    from dpcli.pruning import PruneOptions

    with plugins_loaded([plugin]) as registry:
        loaded = load_model(str(files["dit"]))
        options = PruneOptions(head_ratio=0.25)
        scores = compute_scores(loaded, ScoreSettings("magnitude", head_ratio=0.25))
        settings = PruneSettings(ratio=0.3)
        report = prune_model(loaded, scores, settings, options)
        registry.adapter("dit").save(
            loaded, tmp_path / "out", pruned_metadata(report, scores, settings, options)
        )
        reloaded = load_model(str(tmp_path / "out"))
        adapter = registry.adapter("dit")
        sample = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
        timesteps, labels = torch.tensor([1, 500, 999]), {"class_labels": torch.tensor([0, 7, 10])}
        with torch.no_grad():
            expected = adapter.predict(loaded, sample, timesteps, labels)
            actual = adapter.predict(reloaded, sample, timesteps, labels)
    assert expected.shape == (3, 3, 16, 16)  # the learned-sigma channels are split off
    assert torch.equal(expected, actual)


def test_latent_pipeline_scores_prunes_and_keeps_its_vae(files):
    scored = dit("score", files["pipeline"], "--criterion", "diff-taylor", *scan(files), "--json")
    assert scored.exit_code == 0, scored.stderr
    assert scored.json["cutoff"] is not None and scored.json["groups"] > 0
    out = files["root"] / "latent-pruned"
    pruned = dit(
        "prune", files["pipeline"], "--criterion", "magnitude", "--ratio", "0.25", "-o", out, "--yes"
    )
    assert pruned.exit_code == 0, pruned.stderr
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    inspected = dit("inspect", out, "--json").json
    assert inspected["input_shape"] == [1, 4, 8, 8]
    assert [c["name"] for c in inspected["components"]] == ["vae"]
    assert "DDIMScheduler" in inspected["scheduler"]


def sample_images(adapter, loaded, seed, steps=4, guidance_scale=4.0, **options):
    """A deterministic DDIM loop over the adapter's sampling hooks, as dp eval drives them: one generator
    per sample for ``sampling_conditioning``."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(loaded.scheduler.config)
    scheduler.set_timesteps(steps)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(2)]
    conditioning = adapter.sampling_conditioning(loaded, 2, generators, **options)
    sample = torch.randn((2, *adapter.noise_shape(loaded)), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for t in scheduler.timesteps:
            prediction = adapter.denoise(loaded, sample, t, conditioning, guidance_scale=guidance_scale)
            sample = scheduler.step(prediction, t, sample).prev_sample
        return adapter.decode(loaded, sample)


@pytest.mark.parametrize("model", ["dit", "pipeline"])
def test_sampling_hooks_make_images_in_range(files, model):
    from dpcli.loading import load_model

    with plugins_loaded([plugin]) as registry:
        loaded = load_model(str(files[model]))
        adapter = registry.adapter("dit")
        first = sample_images(adapter, loaded, 0)
        again = sample_images(adapter, loaded, 0)
        labelled = sample_images(adapter, loaded, 0, class_labels=[3])
    assert first.shape == (2, 3, 16, 16) and first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, again) and not torch.equal(first, labelled)


def test_bad_class_labels_and_prompts_are_refused(files):
    from dpcli.loading import load_model

    with plugins_loaded([plugin]) as registry:
        loaded = load_model(str(files["dit"]))
        adapter = registry.adapter("dit")
        with pytest.raises(BadInput, match=r"class labels must be in \[0, 10\)"):
            adapter.sampling_conditioning(loaded, 2, class_labels=[10])
        with pytest.raises(BadInput, match="class-conditional"):
            adapter.sampling_conditioning(loaded, 2, prompt="a church")


def test_latent_dit_without_its_vae_explains_what_is_missing(files):
    result = dit("score", files["pipeline"] / "transformer", "--criterion", "taylor", *scan(files))
    assert result.exit_code == 2
    assert "needs the VAE" in result.stderr


def test_builtin_configs_describe_real_architectures():
    report = dit("inspect", "config:dit-s-2-digits", "--json").json
    assert report["adapter"] == "dit" and report["input_shape"] == [1, 1, 16, 16]


def test_importing_the_plugin_does_not_import_torch():
    code = "import sys, dpcli_dit.plugin; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    )


def installed_version():
    try:
        return metadata.version("dpcli-dit")
    except metadata.PackageNotFoundError:
        return None


@pytest.mark.skipif(installed_version() is None, reason="dpcli-dit is not pip-installed here")
def test_once_installed_dp_finds_it_through_its_entry_point():
    result = run_dp_subprocess("plugins", "--json", env={"DPCLI_PLUGINS": "dpcli-dit"})
    assert result.exit_code == 0, result.stderr
    row = next(row for row in result.json["adapters"] if row["name"] == "dit")
    assert row["package"] == "dpcli-dit" and row["version"] == installed_version() and not row["builtin"]


def class_folders(root, counts, size=16, channels=1):
    """An image folder with one sub-folder per class, named by class index (``{"3": 2}``: two images of 3)."""
    for name, count in counts.items():
        make_image_folder(root / name, count=count, size=size, channels=channels, classes=1, seed=int(name))
    return root


@pytest.mark.slow
def test_prune_finetune_eval_a_class_conditional_dit_through_the_cli(tmp_path, monkeypatch):
    from dpcli_dit import model

    data = class_folders(tmp_path / "digits", {"3": 2, "7": 2})
    seen = []
    prepare = model.DiTAdapter.prepare_batch

    def recording(loaded, images, context):
        seen.extend(context.labels.tolist())
        return prepare(loaded, images, context)

    monkeypatch.setattr(model.DiTAdapter, "prepare_batch", staticmethod(recording))
    pruned, tuned = tmp_path / "pruned", tmp_path / "tuned"
    scan = ["--data", data, "--calib-size", "4", "--timesteps", "3"]
    result = dit("prune", "config:dit-s-2-digits", "--criterion", "diff-taylor", *scan, "--ratio", "0.3",
                 "-o", pruned, "--yes", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert sorted(seen) == [3, 3, 7, 7]  # the calibration batch is conditioned on its class folders
    seen.clear()
    result = dit(
        "finetune", pruned, "--data", data, "--steps", "2", "--batch-size", "2", "-o", tuned, "--json"
    )
    assert result.exit_code == 0, result.stderr
    assert len(seen) == 4 and set(seen) == {3, 7}
    common = ["--num-samples", "2", "--batch-size", "2", "--steps", "2", "--no-latency", "--json"]
    evaluated = dit("eval", tuned, *common, "--class-label", "3", "-o", tmp_path / "eval")
    assert evaluated.exit_code == 0, evaluated.stderr
    protocol = evaluated.json["protocol"]
    assert protocol["class_labels"] == [3] and protocol["guidance_scale"] == 4.0  # DiTPipeline's default
    unguided = dit(
        "eval", tuned, *common, "--class-label", "3", "--guidance-scale", "1", "-o", tmp_path / "u"
    )
    assert unguided.exit_code == 0 and unguided.json["protocol"]["guidance_scale"] == 1
    from safetensors.torch import load_file

    guided, plain = (load_file(tmp_path / name / "samples.safetensors")["images"] for name in ("eval", "u"))
    assert guided.shape == (2, 1, 16, 16) and not torch.equal(guided, plain)
    out_of_range = dit("eval", tuned, *common, "--class-label", "10", "-o", tmp_path / "bad")
    assert out_of_range.exit_code == 2 and "--class-label 10 is out of range" in out_of_range.stderr


def test_unlabelled_data_is_refused_before_any_work(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    make_image_folder(tmp_path / "made", count=2, size=16, channels=1, classes=1)
    for image in (tmp_path / "made").rglob("*.png"):
        image.rename(flat / image.name)
    result = dit("finetune", "config:dit-s-2-digits", "--data", flat, "--steps", "1", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "class sub-folder" in result.stderr
    assert not (tmp_path / "out").exists()


def test_latent_dit_fine_tunes_from_cached_latents(files, tmp_path):
    cache = tmp_path / "latents"
    args = ["--data", files["data"], "--steps", "1", "--batch-size", "2", "--cache-latents", cache]
    result = dit("finetune", files["pipeline"], *args, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert len(list(cache.rglob("*.safetensors"))) == 2  # the batch's two images, encoded by the VAE
