"""`dp compare`: models side by side from the same noise, a grid with one row per model, earlier reports."""

import pytest
from PIL import Image

from dpcli.testing import TINY_UNET_CONFIG, make_unet

FAST = ["--steps", "2", "--num-samples", "3", "--no-latency"]
MODEL_KEYS = {
    "model",
    "adapter",
    "params",
    "macs",
    "blocks",
    "image_shape",
    "from_report",
    "baseline",
    "latency",
    "images_per_second",
    "macs_fraction",
    "macs_ratio",
    "speedup_batch_1",
    "speedup_batch",
    "speedup_per_macs_ratio_batch_1",
    "speedup_per_macs_ratio_batch",
    "ssim",
    "psnr",
    "consistency_note",
    "fid",
    "clip_score",
    "protocol",
    "protocol_note",
    "samples_grid",
}


def test_three_models_side_by_side_with_one_grid_row_each(dp, tmp_path, tiny_unet_folder, pruned_folder):
    out = tmp_path / "cmp"
    result = dp("compare", tiny_unet_folder, pruned_folder, tiny_unet_folder, *FAST, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json
    assert set(report) == {
        "format",
        "dpcli_version",
        "baseline",
        "num_samples",
        "sampling",
        "conditioning",
        "models",
        "output",
        "grid",
    }
    original, pruned, again = report["models"]
    assert all(set(model) == MODEL_KEYS for model in report["models"])
    assert original["baseline"] and original["ssim"] is None
    assert again["ssim"] == pytest.approx(1.0) and again["macs_ratio"] == pytest.approx(1.0)
    assert pruned["ssim"] < 0.999 and pruned["macs_fraction"] < 1 < pruned["macs_ratio"]
    assert pruned["macs_ratio"] == pytest.approx(original["macs"] / pruned["macs"])
    grid = report["grid"]
    assert grid["rows"] == 3 and grid["columns"] == 3
    cell_height, cell_width = grid["cell"]
    with Image.open(out / "grid.png") as image:
        assert image.height == 3 * (cell_height + grid["pad"]) + grid["pad"]
        assert image.width == 3 * (cell_width + grid["pad"]) + grid["pad"]
    assert (out / "compare.json").is_file()


def test_table_shows_speedup_and_block_widths(dp, tiny_unet_folder, pruned_folder):
    result = dp(
        "compare", tiny_unet_folder, pruned_folder, "--steps", "2", "--num-samples", "2",
        "--latency-batch", "2", "--repeats", "1",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    for text in (
        "speedup, batch 1",
        "speedup / MACs ratio",
        "ms/step, batch 2",
        "SSIM to 1st",
        "width conv_in",
    ):
        assert text in result.stdout, text
    assert "/32" in result.stdout  # pruned widths are shown as kept/original


def test_earlier_eval_reports_are_reused(dp, tmp_path, tiny_unet_folder, pruned_folder):
    common = ["--steps", "2", "--num-samples", "3", "--seed", "4", "--no-latency"]
    assert dp("eval", tiny_unet_folder, *common, "-o", tmp_path / "a").exit_code == 0
    assert dp("eval", pruned_folder, *common, "-o", tmp_path / "b").exit_code == 0
    from_reports = dp(
        "compare", "--report", tmp_path / "a", "--report", tmp_path / "b" / "report.json", "--json"
    )
    assert from_reports.exit_code == 0, from_reports.stderr
    assert "Sampling" not in from_reports.stderr
    direct = dp("compare", tiny_unet_folder, pruned_folder, *common, "--json")
    assert direct.exit_code == 0, direct.stderr
    assert from_reports.json["models"][1]["from_report"].endswith("report.json")
    assert from_reports.json["models"][1]["ssim"] == pytest.approx(direct.json["models"][1]["ssim"])
    # A live model samples with the report's settings, so it pairs with the report's images.
    mixed = dp("compare", tiny_unet_folder, "--report", tmp_path / "a", "--no-latency", "--json")
    assert mixed.exit_code == 0, mixed.stderr
    assert mixed.json["sampling"]["seed"] == 4 and mixed.json["models"][1]["ssim"] == pytest.approx(1.0)


@pytest.mark.slow
def test_summary_of_eval_reports_is_one_row_per_model(dp, tmp_path):
    gray = tmp_path / "gray"
    make_unet({**TINY_UNET_CONFIG, "in_channels": 1, "out_channels": 1}).save_pretrained(gray)
    pruned_folder = tmp_path / "gray-pruned"
    assert dp("prune", gray, "--criterion", "magnitude", "--ratio", "0.5", "-o", pruned_folder).exit_code == 0
    common = ["--steps", "2", "--num-samples", "3", "--latency-batch", "2", "--repeats", "1"]
    common += ["--data", "builtin:digits"]
    assert dp("eval", gray, *common, "-o", tmp_path / "original").exit_code == 0
    assert dp("eval", pruned_folder, *common, "-o", tmp_path / "pruned").exit_code == 0
    reports = ["--report", tmp_path / "original", "--report", tmp_path / "pruned"]
    result = dp("compare", *reports, "--num-samples", "3", "--summary")
    assert result.exit_code == 0, result.stderr
    table = result.stdout
    for text in ("params", "MACs", "speedup, batch 1", "speedup, batch 2", "FID", "SSIM to 1st", "baseline"):
        assert text in table, text
    assert "width conv_in" not in table and "PSNR" not in table  # the headline only
    compared = dp("compare", *reports, "--num-samples", "3", "--json").json
    original, pruned = compared["models"]
    assert original["samples_grid"] == str(tmp_path / "original" / "grid.png")
    assert pruned["samples_grid"] == str(tmp_path / "pruned" / "grid.png")
    for value in (f"{original['fid']:.1f}", f"{pruned['fid']:.1f}", f"{pruned['ssim']:.3f}"):
        assert value in table, value


def test_bad_input_exits_2(dp, tmp_path, tiny_unet_folder):
    gray = tmp_path / "gray"
    make_unet({**TINY_UNET_CONFIG, "in_channels": 1, "out_channels": 1}).save_pretrained(gray)
    (tmp_path / "not-a-report.json").write_text("{}")
    cases = [
        ([tiny_unet_folder], "at least two models"),
        ([tiny_unet_folder, gray], "different sample size or channel count"),
        ([tiny_unet_folder, "--report", tmp_path / "missing"], "no dp eval report"),
        ([tiny_unet_folder, "--report", tmp_path / "not-a-report.json"], "is not a dp eval report"),
    ]
    for args, message in cases:
        result = dp("compare", *args, *FAST, "-o", tmp_path / "out")
        assert result.exit_code == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
    assert not (tmp_path / "out").exists()


def test_retime_reports_times_every_model_here_instead_of_the_reports_latency(
    dp, tmp_path, tiny_unet_folder, pruned_folder
):
    import json

    latency = ["--latency-batch", "2", "--repeats", "2"]
    common = ["--steps", "2", "--num-samples", "3", *latency]
    assert dp("eval", tiny_unet_folder, *common, "-o", tmp_path / "a").exit_code == 0
    assert dp("eval", pruned_folder, *common, "-o", tmp_path / "b").exit_code == 0
    report_b = tmp_path / "b" / "report.json"
    recorded = json.loads(report_b.read_text())
    recorded["latency"]["batch_1_ms"] = 1e6  # as if that run had been timed on a crawling machine
    report_b.write_text(json.dumps(recorded))
    reports = ["--report", tmp_path / "a", "--report", tmp_path / "b"]

    taken = dp("compare", *reports, *latency, "--json")
    assert taken.exit_code == 0, taken.stderr
    assert taken.json["models"][1]["latency"]["batch_1_ms"] == 1e6

    retimed = dp("compare", tiny_unet_folder, *reports, *latency, "--retime-reports", "--json")
    assert retimed.exit_code == 0, retimed.stderr
    models = retimed.json["models"]
    assert [m["latency"]["timed_together"] for m in models] == [3, 3, 3]
    assert all(0 < m["latency"]["batch_1_ms"] < 1e5 for m in models)
    assert models[2]["latency"]["repeats"] == 2 and models[2]["from_report"]
    assert models[2]["fid"] == recorded["fid"]  # only the latency is measured again
    summary = dp("compare", *reports, *latency, "--retime-reports", "--summary")
    assert summary.exit_code == 0 and "timed in this run" in summary.stdout


def test_retime_reports_refuses_a_model_that_is_gone_or_changed(
    dp, tmp_path, tiny_unet_folder, pruned_folder
):
    import shutil

    common = ["--steps", "2", "--num-samples", "3", "--no-latency"]
    model = tmp_path / "model"
    shutil.copytree(pruned_folder, model)
    assert dp("eval", model, *common, "-o", tmp_path / "a").exit_code == 0

    def refused(extra, message):
        result = dp(
            "compare", tiny_unet_folder, "--report", tmp_path / "a", *FAST[:4], "--retime-reports", *extra
        )
        assert result.exit_code == 2, (extra, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert "Sampling" not in result.stderr  # refused before any sampling

    refused(["--no-latency"], "cannot go with --no-latency")
    shutil.rmtree(model)
    refused([], "cannot be loaded to time it again")
    shutil.copytree(tiny_unet_folder, model)  # another model in its place
    refused([], "no longer the model the report measured")


def test_models_timed_together_stay_equal_when_the_machine_slows_down_midway():
    from dpcli.jobs.measure import LatencySettings, measure_latencies

    calls = []

    class Sampler:  # two identical models; the machine gets 10x slower halfway through the timing
        device, precision_name = "cpu", "fp32"

        def step_timer(self, batch_size):
            def run():
                calls.append(self)
                return 0.01 if len(calls) <= 10 else 0.1

            return run

    first, second = Sampler(), Sampler()
    latencies = measure_latencies([first, second], LatencySettings(batch=1, warmup=0, repeats=10))
    assert latencies[0]["batch_1_ms"] == latencies[1]["batch_1_ms"]
    assert calls[:4] == [first, second, second, first]  # one step each in turn, the order rotated
