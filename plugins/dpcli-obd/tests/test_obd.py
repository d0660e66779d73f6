"""The obd criterion, tested the way a plugin author would: through dp, with dpcli.testing."""

from importlib import metadata

import dpcli_obd
import pytest
import torch

from dpcli.testing import make_image_folder, run_dp, run_dp_subprocess, save_tiny_unet


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("obd")
    return {
        "model": save_tiny_unet(root / "unet"),
        "data": make_image_folder(root / "images", count=4),
        "root": root,
    }


def scan_args(files, *extra):
    return ["--data", files["data"], "--calib-size", "2", "--timesteps", "4", *extra]


def test_without_the_plugin_obd_is_an_unknown_criterion(files):
    result = run_dp("score", files["model"], "--criterion", "obd", *scan_args(files))
    assert result.exit_code == 2
    assert "unknown criterion 'obd'" in result.stderr


def test_dp_plugins_lists_obd_as_third_party(files):
    data = run_dp("plugins", "--json", plugins=[dpcli_obd]).json
    obd = next(row for row in data["criteria"] if row["name"] == "obd")
    assert obd["status"] == "ok" and obd["builtin"] is False
    assert obd["needs_data"] and obd["needs_gradients"]


def test_dp_score_reports_obd_like_a_builtin(files):
    result = run_dp(
        "score",
        files["model"],
        "--criterion",
        "obd",
        *scan_args(files, "--threshold", "0"),
        "--json",
        plugins=[dpcli_obd],
    )
    assert result.exit_code == 0, result.stderr
    report = result.json
    assert report["criterion"] == "obd" and report["threshold"] == 0
    assert report["timesteps_scanned"] == 4 and report["cutoff"] == 3
    assert report["chunk"] == 1  # second-order scores need each timestep's gradient on its own
    assert report["groups"] > 0 and all(row["min"] >= 0 for row in report["layers"])


@pytest.mark.slow
def test_dp_prune_with_obd_keeps_other_channels_than_magnitude(files):
    kept = {}
    for criterion in ("obd", "magnitude"):
        out = files["root"] / f"pruned-{criterion}"
        result = run_dp(
            "prune",
            files["model"],
            "--criterion",
            criterion,
            "--ratio",
            "0.5",
            *scan_args(files),
            "-o",
            out,
            "--yes",
            "--json",
            plugins=[dpcli_obd],
        )
        assert result.exit_code == 0, result.stderr
        assert result.json["params_after"] < result.json["params_before"]
        from safetensors.torch import load_file

        kept[criterion] = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
        inspected = run_dp("inspect", out, "--json", plugins=[dpcli_obd]).json
        assert inspected["pruned"]["criterion"] == criterion
    assert {k: v.shape for k, v in kept["obd"].items()} == {k: v.shape for k, v in kept["magnitude"].items()}
    assert any(not torch.equal(kept["obd"][k], kept["magnitude"][k]) for k in kept["obd"])


def test_scores_are_w_squared_times_the_fisher_left_in_grad():
    """The criterion's one assumption about torch-pruning: HessianImportance reads .grad as h."""
    import torch_pruning as tp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    for parameter in model.parameters():
        parameter.grad = torch.rand_like(parameter)  # stands in for Σ_t g_t²
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 4))
    group = graph.get_pruning_group(model[0], tp.prune_linear_out_channels, idxs=list(range(6)))
    scores = dpcli_obd.OptimalBrainDamage().importance()(group)
    first, second = model[0].weight, model[2].weight
    expected = ((first**2 * first.grad).sum(1) + (second**2 * second.grad).sum(0)) / 2
    torch.testing.assert_close(scores, expected / expected.mean())


def test_importing_the_plugin_does_not_import_torch():
    code = "import sys, dpcli_obd; print('torch' in sys.modules)"
    import subprocess
    import sys

    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    )


def installed_version():
    try:
        return metadata.version("dpcli-obd")
    except metadata.PackageNotFoundError:
        return None


@pytest.mark.skipif(installed_version() is None, reason="dpcli-obd is not pip-installed here")
def test_once_installed_dp_finds_it_through_its_entry_point():
    result = run_dp_subprocess("plugins", "--json", env={"DPCLI_PLUGINS": "dpcli-obd"})
    assert result.exit_code == 0, result.stderr
    obd = next(row for row in result.json["criteria"] if row["name"] == "obd")
    assert obd["package"] == "dpcli-obd" and obd["version"] == installed_version()
    assert obd["builtin"] is False and obd["status"] == "ok"
