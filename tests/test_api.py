"""The Python API: ``import dpcli`` is cheap, and its functions do what the CLI's commands do."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import dpcli
from dpcli.errors import BadInput, BadSetting
from dpcli.testing import make_image_folder, save_tiny_unet

SCAN = {"calib_size": 4, "timesteps": 8, "threshold": 0.05, "workers": 0}


def test_import_dpcli_does_not_import_torch():
    code = (
        "import sys, dpcli; dpcli.errors.BadInput; dpcli.__version__;"
        "heavy = [m for m in ('torch', 'diffusers', 'numpy') if m in sys.modules];"
        "assert not heavy, heavy; assert callable(dpcli.load) and callable(dpcli.prune)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_public_name_has_a_docstring():
    for name in dpcli.__all__:
        value = getattr(dpcli, name)
        if callable(value):
            assert (value.__doc__ or "").strip(), name
    for cls in (dpcli.Model, dpcli.Scores):
        for attribute, member in vars(cls).items():
            if not attribute.startswith("_") and (callable(member) or isinstance(member, property)):
                assert (member.__doc__ or "").strip(), f"{cls.__name__}.{attribute}"


@pytest.mark.slow
def test_score_prune_save_writes_what_dp_prune_writes(dp, tmp_path):
    model_folder = save_tiny_unet(tmp_path / "unet")
    images = make_image_folder(tmp_path / "images")
    cli = dp(
        "prune", model_folder, "--criterion", "diff-taylor", "--data", images, "--calib-size", "4",
        "--timesteps", "8", "--threshold", "0.05", "--workers", "0", "--ratio", "0.3", "-o", tmp_path / "cli",
    )  # fmt: skip
    assert cli.exit_code == 0, cli.stderr

    model = dpcli.load(model_folder)
    scores = dpcli.score(model, criterion="diff-taylor", data=images, **SCAN)
    assert scores.criterion == "diff-taylor" and scores.cutoff is not None and len(scores.losses) >= 1
    pruned = dpcli.prune(model, scores, ratio=0.3)
    assert pruned is model and pruned.record["history"][0]["step"] == "prune"
    pruned.save(tmp_path / "api")

    cli_meta = json.loads((tmp_path / "cli" / "dpcli.json").read_text())
    api_meta = json.loads((tmp_path / "api" / "dpcli.json").read_text())
    for key in ("pruning", "sizes", "modules", "original_modules", "base"):
        assert api_meta[key] == cli_meta[key], key
    from dpcli.io.weights import load_tensor_file

    cli_weights = load_tensor_file(tmp_path / "cli" / "unet" / "diffusion_pytorch_model.safetensors")
    api_weights = load_tensor_file(tmp_path / "api" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(cli_weights[k], api_weights[k]) for k in cli_weights)
    assert (tmp_path / "api" / "README.md").is_file()
    assert dpcli.load(tmp_path / "api").inspect() == dp("inspect", tmp_path / "cli", "--json").json | {
        "source": str(tmp_path / "api")
    }


def test_pruned_then_finetuned_in_memory_records_both_steps_and_reloads_identically(tmp_path):
    model_folder = save_tiny_unet(tmp_path / "unet")
    images = make_image_folder(tmp_path / "images")
    original_widths = dpcli.load(model_folder).module.conv_in.out_channels
    pruned = dpcli.prune(dpcli.load(model_folder), criterion="magnitude", ratio=0.5)
    seen = []
    tuned = dpcli.finetune(
        pruned, data=images, steps=2, batch_size=2, workers=0, on_step=lambda info: seen.append(info.step)
    )
    assert seen == [1, 2] and tuned.report.steps == 2
    assert [entry["step"] for entry in tuned.record["history"]] == ["prune", "finetune"]
    assert tuned.record["original_modules"]["conv_in"]["out_channels"] == original_widths
    folder = tuned.save(tmp_path / "tuned")
    assert (folder / "unet" / "raw.safetensors").is_file()
    assert not list(tmp_path.glob("dpcli-finetune-*"))
    reloaded = dpcli.load(folder)
    sample, timestep = torch.randn(2, 3, 16, 16), torch.tensor([1, 500])
    with torch.no_grad():
        assert torch.equal(reloaded.module(sample, timestep).sample, tuned.module(sample, timestep).sample)
    assert reloaded.inspect()["pruned"]["criterion"] == "magnitude"


def test_finetune_with_output_writes_dp_finetunes_folder(tmp_path):
    model_folder = save_tiny_unet(tmp_path / "unet")
    images = make_image_folder(tmp_path / "images")
    tuned = dpcli.finetune(
        dpcli.load(model_folder), data=images, steps=1, batch_size=2, workers=0, output=tmp_path / "out"
    )
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"dpcli.json", "unet", "loss.png", "README.md"}
    assert tuned.record["history"][-1]["steps"] == 1
    with pytest.raises(BadSetting, match="holds checkpoints of an earlier run: add resume"):
        dpcli.finetune(dpcli.load(model_folder), data=images, steps=1, output=tmp_path / "out", force=False)


def test_evaluate_takes_models_in_memory_and_matches_dp_eval(dp, tmp_path):
    model_folder = save_tiny_unet(tmp_path / "unet")
    report = dpcli.evaluate(
        dpcli.load(model_folder), reference=model_folder, num_samples=2, steps=4, latency=False
    )
    cli = dp("eval", model_folder, "--num-samples", "2", "--steps", "4", "--no-latency", "-o", tmp_path / "e")
    assert cli.exit_code == 0, cli.stderr
    from dpcli.io.weights import load_tensor_file

    assert torch.equal(
        report.samples.images, load_tensor_file(tmp_path / "e" / "samples.safetensors")["images"]
    )
    assert report.to_json()["ssim"] == pytest.approx(1.0)


def test_mistakes_are_dpcli_errors_naming_the_argument(tmp_path):
    model_folder = save_tiny_unet(tmp_path / "unet")
    with pytest.raises(BadInput, match="model not found"):
        dpcli.load(tmp_path / "nowhere")
    model = dpcli.load(model_folder)
    with pytest.raises(BadSetting, match="give exactly one of ratio, target_macs, target_params"):
        dpcli.prune(model, criterion="magnitude")
    with pytest.raises(BadSetting, match="give criterion"):
        dpcli.prune(model, ratio=0.3)
    with pytest.raises(BadSetting, match="threshold must be in"):
        dpcli.score(model, criterion="diff-taylor", data=tmp_path, threshold=2.0)
    scores = dpcli.score(model, criterion="magnitude")
    dpcli.prune(model, scores, ratio=0.3)
    with pytest.raises(BadInput, match="computed for a model of another shape"):
        dpcli.prune(model, scores, ratio=0.3)
    with pytest.raises(BadSetting, match="label_column needs data"):
        dpcli.finetune(model, data=None, steps=1, label_column="y")


def test_scores_save_and_prune_from_the_file(dp, tmp_path):
    model_folder = save_tiny_unet(tmp_path / "unet")
    scores = dpcli.score(dpcli.load(model_folder), criterion="magnitude")
    scores.save(tmp_path / "scores.safetensors")
    assert scores.to_json()["criterion"] == "magnitude"
    pruned = dpcli.prune(dpcli.load(model_folder), tmp_path / "scores.safetensors", ratio=0.3)
    cli = dp(
        "prune",
        model_folder,
        "--scores",
        tmp_path / "scores.safetensors",
        "--ratio",
        "0.3",
        "--json",
        "-o",
        tmp_path / "p",
    )
    assert pruned.record["sizes"]["params_after"] == cli.json["params_after"]


def test_dp_finetune_and_the_api_refuse_the_same_outputs(dp, tmp_path):
    model_folder = save_tiny_unet(tmp_path / "unet")
    images = make_image_folder(tmp_path / "images")
    itself = dp("finetune", model_folder, "--data", images, "--steps", "1", "-o", model_folder)
    assert itself.exit_code == 2 and f"--output {model_folder} is the model" in itself.stderr
    with pytest.raises(BadSetting, match="is the model: inputs are never modified"):
        dpcli.finetune(dpcli.load(model_folder), data=images, steps=1, output=model_folder)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000001"  # an earlier run's (never read here)
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text("{}")
    again = dp("finetune", model_folder, "--data", images, "--steps", "1", "-o", tmp_path / "run")
    assert again.exit_code == 2 and "add --resume to continue it, or --force" in again.stderr
    resume = dp(
        "finetune", model_folder, "--data", images, "--steps", "1", "--resume", "-o", tmp_path / "new"
    )
    assert resume.exit_code == 2 and "--resume: no checkpoint in" in resume.stderr


# Options only the command line has, because they are about the terminal, not the job.
CLI_ONLY = {
    "json_output",  # --json: how the result is printed (the API returns it)
    "yes",  # --yes: do not ask (the API never asks)
    "summary",  # dp compare --summary: how the result is printed
}


def test_every_cli_option_is_a_keyword_of_its_api_function():
    import inspect

    from dpcli.cli import app

    commands = {info.name or info.callback.__name__: info.callback for info in app.app.registered_commands}
    functions = {
        "score": dpcli.score, "prune": dpcli.prune, "finetune": dpcli.finetune, "eval": dpcli.evaluate,
        "compare": dpcli.compare, "export": dpcli.export, "slice": dpcli.slice,
    }  # fmt: skip
    load = set(inspect.signature(dpcli.load).parameters) - {"reporter"}
    assert {"adapter", "config", "scheduler", "max_params"} <= load
    for name, function in functions.items():
        options = set(inspect.signature(commands[name]).parameters) - {"context"} - CLI_ONLY
        keywords = set(inspect.signature(function).parameters)
        # a command's model: its API function's first parameter
        options.discard("model")
        missing = sorted(options - keywords)
        assert not missing, f"dp {name} options without a dpcli.{function.__name__} keyword: {missing}"
        assert "reporter" in keywords, name


@pytest.mark.slow
def test_score_and_prune_take_the_device_and_scan_options(tmp_path):
    model_folder = save_tiny_unet(tmp_path / "unet")
    images = make_image_folder(tmp_path / "images")
    scores = dpcli.score(
        model_folder, criterion="diff-taylor", data=images, device="cpu", precision="bf16",
        gradient_checkpointing=True, max_params=10**7, **SCAN,
    )  # fmt: skip
    assert scores.to_json()["precision"] == "bf16" and scores.to_json()["device"] == "cpu"
    with pytest.raises(BadSetting, match="precision fp16 needs a CUDA GPU"):
        dpcli.score(
            model_folder, criterion="diff-taylor", data=images, device="cpu", precision="fp16", **SCAN
        )
    pruned = dpcli.prune(
        model_folder, criterion="diff-taylor", data=images, device="cpu", precision="bf16", scan_budget=600,
        ratio=0.3, workers=0, threshold=0.05,
    )  # fmt: skip
    assert pruned.record["pruning"]["scores"]["precision"] == "bf16"
    assert pruned.record["pruning"]["scores"]["scan_budget"] is not None
    with pytest.raises(BadSetting, match="data applies when prune computes the scores"):
        dpcli.prune(model_folder, scores, ratio=0.3, data=images)
    with pytest.raises(BadInput, match="parameters"):
        dpcli.load(model_folder, max_params=10)
