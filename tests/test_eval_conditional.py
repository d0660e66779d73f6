"""`dp eval` and `dp compare` on text- and class-conditional models: prompts and labels decide the images,
guidance changes them, CLIP score, the recorded protocol, captioned grids, and options refused where they
mean nothing.

The models are the tiny random-init pipelines of test_ldm (real diffusers / transformers classes); the CLIP
model for the CLIP score is a tiny random-init CLIPModel with a byte-level tokenizer, saved to a folder.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers.latent import (
    byte_level_tokenizer,
    cross_attention_unet,
    kl_autoencoder,
    latent_unet2d,
    text_encoder,
    write_pipeline,
)
from safetensors.torch import load_file

from dpcli.conditions import read_prompts_file
from dpcli.errors import BadInput

FAST = ["--steps", "2", "--num-samples", "4", "--batch-size", "4", "--no-latency"]
PROTOCOL_KEYS = {
    "num_samples",
    "sampler",
    "spacing",
    "steps",
    "seed",
    "conditioning",
    "guidance_scale",
    "prompts",
    "negative_prompt",
    "class_labels",
    "image_size",
    "fid_implementation",
    "feature_network",
    "feature_weights_sha256",
    "feature_input_size",
    "reference_data",
    "reference_stats",
    "reference_sha256",
    "clip_implementation",
    "clip_model",
    "clip_model_path",
    "clip_weights_sha256",
    "dpcli_version",
    "torch_version",
    "diffusers_version",
    "torchmetrics_version",
}


def tiny_clip(folder):
    """A random-init CLIPModel (32-px images, 77 tokens) with its processor, saved like a Hub CLIP folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = byte_level_tokenizer(folder / "tokenizer-files", max_length=77)
    vocab = len(tokenizer)
    config = CLIPConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": vocab - 2,
            "eos_token_id": vocab - 1,
            "pad_token_id": vocab - 1,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("conditional")
    tokenizer = byte_level_tokenizer(root / "tokenizer-files")
    return {
        "root": root,
        "sd": write_pipeline(
            root / "sd",
            cross_attention_unet(),
            kl_autoencoder(),
            text=text_encoder(len(tokenizer)),
            tokenizer=tokenizer,
        ),
        "class": write_pipeline(root / "class-ldm", latent_unet2d(4, num_class_embeds=3), kl_autoencoder()),
        "clip": tiny_clip(root / "clip"),
    }


def samples_of(folder):
    return load_file(folder / "samples.safetensors")["images"]


def test_prompt_files_in_every_format(tmp_path):
    lines = tmp_path / "prompts.txt"
    lines.write_text("a red square\n\n  a blue circle  \n")
    jsonl = tmp_path / "metadata.jsonl"
    jsonl.write_text('{"file_name": "a.png", "text": "one"}\n{"caption": "two"}\n')
    listing = tmp_path / "captions.txt"
    listing.write_text("a.png\tfirst\nb.png\tsecond\n")
    coco = tmp_path / "captions_val2014.json"
    coco.write_text(
        json.dumps(
            {
                "annotations": [
                    {"image_id": 7, "caption": "a dog "},
                    {"image_id": 9, "caption": "a cat"},
                    {"image_id": 7, "caption": "another caption of the dog"},
                ]
            }
        )
    )
    assert read_prompts_file(lines).prompts == ["a red square", "a blue circle"]
    assert read_prompts_file(jsonl).prompts == ["one", "two"]
    assert read_prompts_file(listing).prompts == ["first", "second"]
    assert read_prompts_file(coco).prompts == ["a dog", "a cat"]  # the first caption of each image
    assert read_prompts_file(coco).record()["file_sha256"] != read_prompts_file(lines).record()["file_sha256"]
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "bad.jsonl").write_text('{"file_name": "a.png"}\n')
    for bad, message in (("empty.txt", "holds no prompts"), ("bad.jsonl", "bad.jsonl:1")):
        with pytest.raises(BadInput, match=message):
            read_prompts_file(tmp_path / bad)


def test_prompts_and_guidance_decide_the_images(dp, models, tmp_path):
    sd = models["sd"]
    first = dp("eval", sd, *FAST, "--prompt", "a red square", "--prompt", "a blue circle",
               "--data", "builtin:digits", "-o", tmp_path / "ab", "--json")  # fmt: skip
    assert first.exit_code == 0, first.stderr
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na green field\n")
    second = dp("eval", sd, *FAST, "--prompts", prompts, "--guidance-scale", "7.5", "-o", tmp_path / "ac")
    assert second.exit_code == 0, second.stderr
    unguided = dp("eval", sd, *FAST, "--prompt", "a red square", "--prompt", "a blue circle",
                  "--guidance-scale", "1", "-o", tmp_path / "ab-unguided")  # fmt: skip
    assert unguided.exit_code == 0, unguided.stderr
    ab, ac, ab_unguided = (samples_of(tmp_path / name) for name in ("ab", "ac", "ab-unguided"))
    # Sample i gets prompt i mod 2: samples 0 and 2 asked for the red square in both runs, 1 and 3 did not.
    assert torch.equal(ab[[0, 2]], ac[[0, 2]])
    assert not torch.equal(ab[1], ac[1]) and not torch.equal(ab[3], ac[3])
    assert not torch.equal(ab, ab_unguided)  # guidance 7.5 (the default for a text model) vs 1

    report = first.json
    protocol = report["protocol"]
    assert set(protocol) == PROTOCOL_KEYS
    assert protocol["conditioning"] == "text" and protocol["guidance_scale"] == 7.5
    assert protocol["prompts"]["prompts"] == ["a red square", "a blue circle"]
    assert protocol["num_samples"] == 4 and protocol["steps"] == 2 and protocol["sampler"] == "ddim"
    assert protocol["feature_network"] == "dpcli-digits" and protocol["feature_input_size"] == [16, 16]
    assert protocol["image_size"] == [16, 16] and protocol["reference_data"] == "builtin:digits"
    assert len(protocol["reference_sha256"]) == 64 and protocol["torch_version"] == torch.__version__
    assert report["fid"] is not None and report["sampling"]["guidance_scale"] == 7.5
    assert report["grid"]["captions"] == ["a red square", "a blue circle"]
    assert report["clip_score"] is None and "--clip-model" in report["clip_info"]["unavailable"]
    recorded = json.loads((tmp_path / "ac" / "report.json").read_text())["protocol"]["prompts"]
    assert recorded["file"] == str(prompts) and recorded["count"] == 2
    assert recorded["file_sha256"] == read_prompts_file(prompts).file_sha256


def test_clip_score_with_a_local_clip_model(dp, models, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    prompts = ["a red square", "a blue circle"]
    out = tmp_path / "eval"
    result = dp("eval", models["sd"], *FAST, "--prompt", prompts[0], "--prompt", prompts[1],
                "--clip-model", models["clip"], "-o", out, "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = result.json
    # The same number the long way: CLIPModel's forward gives both embeddings; 100 x cosine, averaged.
    folder = str(models["clip"])
    model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    images = samples_of(out)
    inputs = processor(text=[prompts[i % 2] for i in range(4)], images=list(images), return_tensors="pt",
                       padding=True)  # fmt: skip
    with torch.no_grad():
        output = model(**inputs)
    cosine = torch.nn.functional.cosine_similarity(output.image_embeds, output.text_embeds)
    assert report["clip_score"] == pytest.approx(max(0.0, float(100 * cosine.mean())), abs=1e-3)
    assert report["clip_info"]["samples"] == 4 and report["clip_info"]["image_size"] == [32, 32]
    protocol = report["protocol"]
    assert protocol["clip_model"] == folder and len(protocol["clip_weights_sha256"]) == 64
    missing = dp("eval", models["sd"], *FAST, "--prompt", "x", "--clip-model", tmp_path / "no-clip-here")
    assert missing.exit_code == 2 and "--clip-model" in missing.stderr and "Sampling" not in missing.stderr


def test_class_labels_reach_the_unet(dp, models, tmp_path, monkeypatch):
    from diffusers import UNet2DModel

    seen = []
    forward = UNet2DModel.forward

    def recording(self, sample, timestep, class_labels=None, **kwargs):
        if len(sample) == 4:  # the sampler's batches (MAC counting runs a batch of 1)
            seen.append(class_labels.tolist())
        return forward(self, sample, timestep, class_labels=class_labels, **kwargs)

    monkeypatch.setattr(UNet2DModel, "forward", recording)
    result = dp("eval", models["class"], *FAST, "--class-label", "2", "--class-label", "0", "-o", tmp_path / "a",
                "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert seen == [[2, 0, 2, 0]] * 2  # both denoising steps
    assert (
        result.json["protocol"]["class_labels"] == [2, 0] and result.json["protocol"]["guidance_scale"] == 1
    )
    assert result.json["grid"]["captions"] == ["class 2", "class 0"]
    seen.clear()
    spread = dp("eval", models["class"], *FAST, "--json")
    assert spread.exit_code == 0, spread.stderr
    assert seen == [[0, 1, 2, 0]] * 2  # every class in turn
    assert spread.json["protocol"]["class_labels"] == [0, 1, 2]


def test_options_that_mean_nothing_for_a_model_are_refused(dp, models, tiny_unet_folder, tmp_path):
    cases = [
        (tiny_unet_folder, ["--prompt", "a cat"], "--prompt applies to text-conditional models"),
        (tiny_unet_folder, ["--guidance-scale", "3"], "--guidance-scale applies to conditional models"),
        (tiny_unet_folder, ["--class-label", "1"], "--class-label applies to class-conditional models"),
        (tiny_unet_folder, ["--clip-model", models["clip"]], "--clip-model scores text-conditional"),
        (models["class"], ["--prompts", tmp_path / "p.txt"], "--prompts applies to text-conditional"),
        (models["class"], ["--class-label", "3"], "--class-label 3 is out of range"),
        (models["class"], ["--guidance-scale", "3"], "classifier-free guidance is not possible"),
        (models["sd"], ["--class-label", "1"], "--class-label applies to class-conditional models"),
        (models["sd"], ["--negative-prompt", "x", "--guidance-scale", "1"], "--negative-prompt only acts"),
        (models["sd"], ["--prompt", "x", "--prompts", tmp_path / "p.txt"], "not both"),
        (models["sd"], ["--prompts", tmp_path / "p.txt"], "file not found"),
        (models["sd"], ["--guidance-scale", "-2"], "--guidance-scale must be a number >= 0"),
        (models["sd"], ["--clip-model", models["clip"]], "--clip-model scores images against their prompts"),
    ]
    for model, args, message in cases:
        for command in ("eval", "compare"):
            extra = [model] if command == "compare" else []
            result = dp(command, model, *extra, *FAST, *args, "-o", tmp_path / "out")
            if command == "compare" and args[0] == "--clip-model":
                assert result.exit_code == 2 and "No such option" in result.stderr
                continue
            assert result.exit_code == 2, (command, args, result.stderr)
            assert message in result.stderr and "Traceback" not in result.stderr, (
                command,
                args,
                result.stderr,
            )
            assert "Sampling" not in result.stderr, (command, args)
    assert not (tmp_path / "out").exists()


def test_compare_samples_every_model_with_the_same_prompts(dp, models, tmp_path):
    out = tmp_path / "cmp"
    result = dp("compare", models["sd"], models["sd"], *FAST, "--prompt", "a red square",
                "--prompt", "a blue circle", "--guidance-scale", "2", "-o", out, "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = result.json
    assert report["models"][1]["ssim"] == pytest.approx(1.0)
    assert report["conditioning"]["prompts"]["prompts"] == ["a red square", "a blue circle"]
    assert report["sampling"]["guidance_scale"] == 2.0
    grid = report["grid"]
    assert grid["captions"] == ["a red square", "a blue circle", "a red square", "a blue circle"]
    assert grid["caption_height"] > 0
    from PIL import Image

    with Image.open(out / "grid.png") as image:
        assert image.height == grid["caption_height"] + 2 * (grid["cell"][0] + grid["pad"]) + grid["pad"]


@pytest.mark.slow
def test_reports_with_different_protocols_are_refused(dp, tiny_unet_folder, tmp_path):
    common = ["--num-samples", "3", "--no-latency", "--data", "builtin:digits"]
    assert dp("eval", tiny_unet_folder, "--steps", "2", *common, "-o", tmp_path / "a").exit_code == 0
    assert dp("eval", tiny_unet_folder, "--steps", "3", *common, "-o", tmp_path / "b").exit_code == 0
    assert dp("eval", tiny_unet_folder, "--steps", "2", *common, "-o", tmp_path / "c").exit_code == 0
    refused = dp("compare", "--report", tmp_path / "a", "--report", tmp_path / "b", "-o", tmp_path / "cmp")
    assert refused.exit_code == 2 and "different protocols" in refused.stderr
    assert "steps 2 vs 3" in refused.stderr and "--mixed-protocols" in refused.stderr
    assert not (tmp_path / "cmp").exists()
    same = dp("compare", "--report", tmp_path / "a", "--report", tmp_path / "c", "--json")
    assert same.exit_code == 0, same.stderr
    assert (
        same.json["models"][1]["protocol_note"] is None and same.json["models"][1]["protocol"]["steps"] == 2
    )
    mixed = dp("compare", "--report", tmp_path / "a", "--report", tmp_path / "b", "--mixed-protocols")
    assert mixed.exit_code == 0, mixed.stderr
    assert "PROTOCOL DIFFERS" in mixed.stdout and "steps 2 vs 3" in mixed.stdout


def test_a_live_model_samples_with_the_prompts_of_a_report(dp, models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na green field\n")
    report = tmp_path / "report"
    made = dp("eval", models["sd"], *FAST, "--prompts", prompts, "--guidance-scale", "3", "-o", report)
    assert made.exit_code == 0, made.stderr
    result = dp("compare", models["sd"], "--report", report, "--num-samples", "4", "--no-latency", "--json")
    assert result.exit_code == 0, result.stderr
    live, reported = result.json["models"]
    assert result.json["sampling"]["guidance_scale"] == 3.0 and reported["ssim"] == pytest.approx(1.0)
    assert result.json["conditioning"]["prompts"]["file"] == str(prompts)
    prompts.write_text("something else\n")
    changed = dp("compare", models["sd"], "--report", report, "--num-samples", "4", "--no-latency")
    assert changed.exit_code == 2 and "changed since the report was made" in changed.stderr


@pytest.mark.slow
def test_the_api_conditions_and_guides_as_dp_eval_does(dp, models, tiny_unet_folder, tmp_path):
    import dpcli
    from dpcli.errors import BadSetting

    prompts = ["a red square", "a blue circle"]
    report = dpcli.evaluate(
        models["sd"], prompt=prompts, guidance_scale=2.0, clip_model=models["clip"],
        steps=2, num_samples=4, batch_size=4, latency=False,
    ).to_json()  # fmt: skip
    cli = dp("eval", models["sd"], *FAST, "--prompt", prompts[0], "--prompt", prompts[1], "--guidance-scale",
             "2.0", "--clip-model", models["clip"], "-o", tmp_path / "cli", "--json")  # fmt: skip
    assert cli.exit_code == 0, cli.stderr
    assert report["sampling"]["guidance_scale"] == 2.0 and report["protocol"]["guidance_scale"] == 2.0
    assert report["protocol"] == cli.json["protocol"] and report["protocol"]["prompts"]["prompts"] == prompts
    assert report["clip_score"] == pytest.approx(cli.json["clip_score"]) and report["clip_score"] is not None
    images = dpcli.evaluate(
        models["sd"], prompt=prompts, guidance_scale=2.0, steps=2, num_samples=4, batch_size=4, latency=False
    ).samples.images
    assert torch.equal(images, samples_of(tmp_path / "cli"))
    # A pixel DDPM has no text input: refused as dp eval refuses it, not sampled without the prompt.
    with pytest.raises(BadSetting, match="prompt applies to text-conditional models"):
        dpcli.evaluate(tiny_unet_folder, prompt="a cat", steps=2, num_samples=4, latency=False)
    with pytest.raises(BadSetting, match="class_label applies to class-conditional models"):
        dpcli.evaluate(models["sd"], class_label=1, steps=2, num_samples=4, latency=False)
