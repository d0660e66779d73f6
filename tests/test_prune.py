"""`dp prune`: every criterion really removes channels, reloads identically, lands on targets."""

import json

import pytest
import torch

from dpcli.jobs.prune import PruneSettings, prune_model, pruned_metadata
from dpcli.jobs.score import ScoreSettings, compute_scores
from dpcli.loading import load_model
from dpcli.testing import TINY_UNET_CONFIG, make_unet


def prune_args(model, data, out, *extra):
    return [
        "prune",
        model,
        "--data",
        data,
        "--calib-size",
        "4",
        "--timesteps",
        "8",
        "-o",
        out,
        "--yes",
        *extra,
    ]


@pytest.mark.parametrize("criterion", ["diff-taylor", "taylor", "magnitude", "random", "reinit"])
@pytest.mark.slow
def test_every_criterion_prunes_through_the_cli(dp, tmp_path, tiny_unet_folder, image_folder, criterion):
    out = tmp_path / f"pruned-{criterion}"
    result = dp(
        *prune_args(tiny_unet_folder, image_folder, out, "--criterion", criterion, "--ratio", "0.5", "--json")
    )
    assert result.exit_code == 0, result.stderr
    report = result.json
    assert report["params_after"] < report["params_before"] and report["macs_after"] < report["macs_before"]
    assert report["output"] == str(out)
    reloaded = load_model(str(out))
    assert sum(p.numel() for p in reloaded.model.parameters()) == report["params_after"]
    assert reloaded.model.conv_out.out_channels == 3
    assert reloaded.model.conv_in.out_channels < 32
    inspected = dp("inspect", out, "--json").json
    conv_in = next(row for row in inspected["layers"] if row["name"] == "conv_in")
    assert conv_in["original_out_channels"] == 32 and conv_in["out_channels"] < 32
    assert inspected["pruned"]["criterion"] == criterion


@pytest.mark.slow
def test_reload_gives_identical_outputs(tmp_path, tiny_unet_folder, image_folder):
    loaded = load_model(str(tiny_unet_folder))
    scores = compute_scores(
        loaded,
        ScoreSettings("diff-taylor", data=str(image_folder), threshold=0.995, calib_size=4, timesteps=10),
    )
    settings = PruneSettings(ratio=0.4)
    report = prune_model(loaded, scores, settings, scores_options())
    loaded.adapter.save(loaded, tmp_path / "out", pruned_metadata(report, scores, settings, scores_options()))
    reloaded = load_model(str(tmp_path / "out"))
    sample = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    timesteps = torch.tensor([5, 700])
    with torch.no_grad():
        expected = loaded.model(sample, timesteps).sample
        actual = reloaded.model(sample, timesteps).sample
    assert torch.equal(expected, actual)
    metadata = json.loads((tmp_path / "out" / "dpcli.json").read_text())
    assert (
        metadata["pruning"]["criterion"] == "diff-taylor" and metadata["pruning"]["cutoff"] == report.cutoff
    )
    assert not list((tmp_path / "out").rglob("*.bin")) and not list((tmp_path / "out").rglob("*.pt*"))


def scores_options():
    from dpcli.pruning import PruneOptions

    return PruneOptions()


def test_multi_head_attention_and_head_pruning_reload_identically(tmp_path, image_folder):
    config = {**TINY_UNET_CONFIG, "attention_head_dim": 8}
    folder = tmp_path / "mh"
    make_unet(config).save_pretrained(folder)
    from dpcli.pruning import PruneOptions

    loaded = load_model(str(folder))
    options = PruneOptions(head_ratio=0.25)
    scores = compute_scores(loaded, ScoreSettings("magnitude", head_ratio=0.25))
    settings = PruneSettings(ratio=0.25)
    report = prune_model(loaded, scores, settings, options)
    attention = loaded.model.down_blocks[1].attentions[0]
    assert attention.heads == 6 and attention.to_q.out_features % attention.heads == 0
    loaded.adapter.save(loaded, tmp_path / "out", pruned_metadata(report, scores, settings, options))
    reloaded = load_model(str(tmp_path / "out"))
    sample = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(sample, 10).sample, reloaded.model(sample, 10).sample)


def test_target_macs_lands_within_five_percent(dp, tmp_path, image_folder):
    folder = tmp_path / "wide"
    make_unet({**TINY_UNET_CONFIG, "norm_num_groups": 4}).save_pretrained(folder)
    result = dp(
        "prune", folder, "--criterion", "magnitude", "--target-macs", "0.6", "-o", tmp_path / "out", "--json"
    )
    assert result.exit_code == 0, result.stderr
    report = result.json
    assert abs(report["macs_after"] / report["macs_before"] - 0.6) <= 0.05 * 0.6
    assert report["trials"], "a target is reached by searching the ratio"


@pytest.mark.slow
def test_scores_file_gives_the_same_pruned_weights(dp, tmp_path, tiny_unet_folder, image_folder):
    from safetensors.torch import load_file

    scores = tmp_path / "scores.safetensors"
    common = ["--calib-size", "4", "--timesteps", "8", "--threshold", "0.995", "--seed", "3"]
    assert dp("score", tiny_unet_folder, "--data", image_folder, *common, "-o", scores).exit_code == 0
    assert (
        dp("prune", tiny_unet_folder, "--scores", scores, "--ratio", "0.5", "-o", tmp_path / "a").exit_code
        == 0
    )
    inline = dp(
        "prune",
        tiny_unet_folder,
        "--criterion",
        "diff-taylor",
        "--data",
        image_folder,
        *common,
        "--ratio",
        "0.5",
        "-o",
        tmp_path / "b",
    )
    assert inline.exit_code == 0, inline.stderr
    first = load_file(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors")
    second = load_file(tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_card_example_works(dp, tmp_path, tiny_unet_folder, image_folder):
    result = dp(
        "prune",
        tiny_unet_folder,
        "--criterion",
        "diff-taylor",
        "--threshold",
        "0.1",
        "--ratio",
        "0.3",
        "--data",
        image_folder,
        "--calib-size",
        "2",
        "--timesteps",
        "5",
        "-o",
        tmp_path / "card",
    )
    assert result.exit_code == 0, result.stderr
    assert "Totals" in result.stdout and "kept" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--criterion", "magnitude", "--ratio", "1.0"], "--ratio must be in [0, 1)"),
        (["--criterion", "magnitude", "--ratio", "-0.1"], "--ratio must be in [0, 1)"),
        (
            ["--criterion", "diff-taylor", "--ratio", "0.3", "--threshold", "1.5"],
            "--threshold must be in [0, 1]",
        ),
        (
            ["--scores", "scores.safetensors", "--ratio", "0.3", "--threshold", "2"],
            "--threshold must be in [0, 1]",
        ),
        (["--criterion", "diff-taylr", "--ratio", "0.3"], "did you mean 'diff-taylor'"),
        (["--criterion", "taylor", "--ratio", "0.3"], "needs calibration data"),
        (["--criterion", "magnitude"], "give one of --ratio, --target-macs, --target-params"),
        (["--ratio", "0.3"], "--criterion is required"),
        (["--criterion", "magnitude", "--ratio", "0.3", "--target-macs", "0.5"], "exactly one of"),
        (
            ["--criterion", "magnitude", "--target-macs", "0.999", "--tolerance", "0.0001"],
            "cannot be reached",
        ),
        (["--criterion", "magnitude", "--ratio", "0.3", "--ignore", "no_such_layer"], "matches no module"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(dp, tmp_path, tiny_unet_folder, args, message):
    out = tmp_path / "out"
    result = dp("prune", tiny_unet_folder, "-o", out, *args)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-unet"]


def test_bad_data_is_named(dp, tmp_path, tiny_unet_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.jpg").write_bytes(b"nope")
    for data, message in ((empty, "no images"), (broken, "bad.jpg")):
        result = dp(
            "prune",
            tiny_unet_folder,
            "--criterion",
            "diff-taylor",
            "--ratio",
            "0.3",
            "--data",
            data,
            "--calib-size",
            "1",  # only the chosen calibration images are decoded
            "-o",
            tmp_path / "out",
        )
        assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(dp, tmp_path, tiny_unet_folder):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = dp("prune", tiny_unet_folder, "--criterion", "magnitude", "--ratio", "0.3", "-o", out)
    assert result.exit_code == 2 and "--force" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"
    forced = dp("prune", tiny_unet_folder, "--criterion", "magnitude", "--ratio", "0.3", "-o", out, "--force")
    assert forced.exit_code == 0 and (out / "dpcli.json").exists() and not (out / "keep.txt").exists()


def test_input_model_is_not_modified(dp, tmp_path, tiny_unet_folder):
    before = {p.name: p.read_bytes() for p in tiny_unet_folder.iterdir()}
    assert (
        dp(
            "prune", tiny_unet_folder, "--criterion", "random", "--ratio", "0.3", "-o", tmp_path / "o"
        ).exit_code
        == 0
    )
    assert {p.name: p.read_bytes() for p in tiny_unet_folder.iterdir()} == before


def expected_pruned(original: torch.Tensor, kept: dict) -> torch.Tensor:
    """The original tensor at the recorded kept indices: rows = out channels, columns = in channels."""
    result = original
    if "out" in kept:
        result = result.index_select(0, torch.tensor(kept["out"]))
    if "in" in kept and result.dim() > 1:
        result = result.index_select(1, torch.tensor(kept["in"]))
    return result


@pytest.mark.parametrize("criterion", ["diff-taylor", "magnitude"])
@pytest.mark.slow
def test_kept_channels_are_recorded_and_match_the_saved_weights(dp, tmp_path, image_folder, criterion):
    from safetensors.torch import load_file

    folder = tmp_path / "mh"
    base = make_unet({**TINY_UNET_CONFIG, "attention_head_dim": 8})
    base.save_pretrained(folder)
    out = tmp_path / "out"
    extra = (
        ["--data", image_folder, "--calib-size", "4", "--timesteps", "8"]
        if criterion == "diff-taylor"
        else []
    )
    result = dp(
        "prune", folder, "--criterion", criterion, "--ratio", "0.5", "--head-ratio", "0.25", "-o", out, *extra
    )
    assert result.exit_code == 0, result.stderr
    info = json.loads((out / "dpcli.json").read_text())
    kept = info["pruning"]["kept_channels"]
    original = base.state_dict()
    saved = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    changed = set()
    for name, tensor in saved.items():
        module = name.rsplit(".", 1)[0]
        if tensor.shape != original[name].shape:
            changed.add(module)
            assert module in kept, f"{module} changed shape but its kept channels are not recorded"
        assert torch.equal(expected_pruned(original[name], kept.get(module, {})), tensor), name
    assert "conv_in" in changed and "out" not in kept["conv_out"], "the output conv keeps its 3 channels"
    attention = "down_blocks.1.attentions.0"
    assert kept[attention]["heads"] == sorted(kept[attention]["heads"])
    assert len(kept[attention]["heads"]) == info["modules"][attention]["heads"] == 6
    for module, sides in kept.items():
        for side, indices in sides.items():
            if side != "heads":
                width = info["modules"][module][f"{side}_channels"]
                assert len(indices) == width and len(set(indices)) == width, (module, side)
