"""`dp inspect` on every kind of input a user has, and clean errors on bad ones."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from dpcli.testing import TINY_UNET_CONFIG, make_unet, run_dp_subprocess


def test_cifar10_config_matches_the_paper_model(dp):
    result = dp("inspect", "config:ddpm-cifar10-32", "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json
    assert report["params"] == 35_746_307
    # 6.07 G in conv/linear/norm layers (the paper's "6.1G") + 0.17 G attention matmuls fvcore skips.
    assert 6.0e9 < report["macs"] - report["macs_attention"] < 6.15e9
    assert 0.1e9 < report["macs_attention"] < 0.25e9
    assert sum(layer["macs"] for layer in report["layers"]) == report["macs"]
    assert sum(layer["params"] for layer in report["layers"]) == report["params"]
    conv_out = next(layer for layer in report["layers"] if layer["name"] == "conv_out")
    assert (conv_out["type"], conv_out["in_channels"], conv_out["out_channels"]) == ("Conv2d", 128, 3)


def test_table_output_and_depth_grouping(dp):
    result = dp("inspect", "config:ddpm-digits", "--depth", "1")
    assert result.exit_code == 0, result.stderr
    assert "1,112,801" in result.stdout
    for block in ("down_blocks", "mid_block", "up_blocks", "conv_out"):
        assert block in result.stdout
    grouped = dp("inspect", "config:ddpm-digits", "--depth", "1", "--json").json
    assert {row["name"] for row in grouped["layers"]} >= {"down_blocks", "up_blocks", "mid_block"}


def test_model_folder_and_pipeline_folder(dp, tiny_unet_folder, tiny_pipeline_folder, tiny_unet):
    params = sum(p.numel() for p in tiny_unet.parameters())
    folder = dp("inspect", tiny_unet_folder, "--json").json
    assert folder["params"] == params
    assert folder["source_kind"] == "diffusers model folder"
    assert "DDPMScheduler defaults" in folder["scheduler"]
    pipeline = dp("inspect", tiny_pipeline_folder, "--json").json
    assert pipeline["params"] == params
    assert pipeline["scheduler"].startswith("DDIMScheduler from the pipeline, 500")


def test_single_files_in_diffusers_layout(dp, tmp_path, tiny_unet):
    state = tiny_unet.state_dict()
    save_file(state, tmp_path / "unet.safetensors")
    torch.save(state, tmp_path / "unet.pt")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_UNET_CONFIG))
    for name in ("unet.safetensors", "unet.pt"):
        report = dp("inspect", tmp_path / name, "--config", config, "--json")
        assert report.exit_code == 0, report.stderr
        assert report.json["params"] == sum(p.numel() for p in tiny_unet.parameters())
    inferred = dp("inspect", tmp_path / "unet.safetensors", "--json").json
    assert any("inferred" in note for note in inferred["notes"])
    assert inferred["params"] == sum(p.numel() for p in tiny_unet.parameters())


@pytest.mark.slow
def test_hub_id_through_local_cache_offline(tmp_path, tiny_pipeline_folder):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--example--tiny-ddpm"
    snapshot = repo / "snapshots" / commit
    snapshot.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(tiny_pipeline_folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = run_dp_subprocess("inspect", "example/tiny-ddpm", "--json", env=env)
    assert result.exit_code == 0, result.stderr
    assert result.json["source_kind"] == "diffusers pipeline (Hub cache)"
    missing = run_dp_subprocess("inspect", "example/not-cached", env=env)
    assert missing.exit_code == 2
    assert "not in the local Hugging Face cache" in missing.stderr
    assert "Traceback" not in missing.stderr


class _RunsCode:
    """Unpickling this calls os.system: exactly what must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickle_is_refused_and_never_runs(dp, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as handle:
        pickle.dump({"conv_in.weight": _RunsCode(marker)}, handle)
    result = dp("inspect", evil)
    assert result.exit_code == 2
    assert "refusing to load" in result.stderr and "arbitrary code" in result.stderr
    assert not marker.exists()


def _write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda tmp: tmp / "nope", "model not found"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "is empty"),
        (
            lambda tmp: _write(tmp / "bad.safetensors", b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":'),
            "not a valid safetensors file",
        ),
        (
            lambda tmp: _write(tmp / "text.safetensors", "hello world, not tensors"),
            "not a valid safetensors file",
        ),
        (lambda tmp: _write(tmp / "junk.ckpt", b"\x00garbage"), "not a readable PyTorch"),
    ],
    ids=["missing", "empty-folder", "truncated-safetensors", "text-as-safetensors", "junk-ckpt"],
)
def test_bad_model_inputs_exit_2_with_one_line(dp, tmp_path, setup, message):
    result = dp("inspect", setup(tmp_path))
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_adapter_suggests(dp):
    result = dp("inspect", "config:ddpm-digits", "--adapter", "ddmp")
    assert result.exit_code == 2
    assert "unknown adapter 'ddmp'" in result.stderr and "'ddpm'" in result.stderr


def test_truncated_real_checkpoint(dp, tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(make_unet(seed=1).state_dict(), good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    result = dp("inspect", truncated)
    assert result.exit_code == 2 and "not a valid safetensors file" in result.stderr


def test_original_ddpm_layout_checkpoint_is_converted(dp, tmp_path, tiny_unet):
    from dpcli.adapters.ddpm_original import diffusers_to_original

    original = diffusers_to_original(tiny_unet.state_dict(), dict(tiny_unet.config))
    torch.save({k: v.clone() for k, v in original.items()}, tmp_path / "model.ckpt")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_UNET_CONFIG))
    report = dp("inspect", tmp_path / "model.ckpt", "--config", config, "--json")
    assert report.exit_code == 0, report.stderr
    assert report.json["source_kind"] == "single file, original DDPM layout"
    assert report.json["params"] == sum(p.numel() for p in tiny_unet.parameters())


def test_debug_flag_shows_the_traceback(dp, tmp_path):
    quiet = dp("inspect", tmp_path / "nope")
    loud = dp("--debug", "inspect", tmp_path / "nope")
    assert quiet.exit_code == loud.exit_code == 2
    assert "Traceback" not in quiet.stderr and "Traceback" in loud.stderr


def test_scheduler_override(dp, tmp_path, tiny_unet_folder):
    from diffusers import DDIMScheduler

    DDIMScheduler(num_train_timesteps=250).save_config(tmp_path / "sched")
    report = dp("inspect", tiny_unet_folder, "--scheduler", tmp_path / "sched", "--json").json
    assert report["scheduler"].startswith("DDIMScheduler from --scheduler") and report["scheduler"].endswith(
        "250 training steps"
    )
    missing = dp("inspect", tiny_unet_folder, "--scheduler", tmp_path / "nothing")
    assert missing.exit_code == 2 and "scheduler not found" in missing.stderr
