"""Bad samples in big data sets: an undecodable image is skipped (replaced by the next good one), named once
on stderr, counted and listed in the report, and a run whose data is mostly broken stops with exit 2 (a
fine-tune after writing a checkpoint). ``--on-bad-sample fail`` keeps the old one-line error."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.processes import SUBPROCESS_ENV, assert_same_weights, one_thread, popen_dp, wait_for
from PIL import Image
from test_data import captioned_folder, folder_rows, write_shards
from test_faults import final_weights, one_error_line
from test_finetune import UNCLIPPED, assert_equivalent_runs

from dpcli.data import ImageTransform, load_images, open_source, training_batches
from dpcli.data.bad_samples import BadSampleLog, TooManyBadSamples, allowed_bad
from dpcli.data.base import DataSpec, data_spec
from dpcli.data.loader import DataOrder
from dpcli.errors import BadInput, BadSetting
from dpcli.testing import save_tiny_unet

COUNT = 200  # "hundreds": one bad image is 0.5 % of them, under the default cap of 1 %


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


def jpeg_folder(root: Path, count: int = COUNT, corrupt=()) -> Path:
    """``count`` 8x8 JPEGs ``img_000.jpg``...; those at ``corrupt`` (indices) cut in half, as a download
    that stopped."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        path = root / f"img_{index:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path, quality=90)
        if index in corrupt:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
    return root


def read_order(count: int = COUNT, seed: int = 0, length: int = 16) -> list[int]:
    """The example indices the first ``length`` training rows read with ``seed`` (files sort by name)."""
    return DataOrder(count, seed).indices(0, length).tolist()


def finetune_args(model, data, out, *extra, steps=4, every=1, batch=4):
    return [
        "finetune", model, "--data", data, "--steps", steps, "--batch-size", batch, "--lr", "1e-3",
        "--checkpoint-every", every, "--keep-checkpoints", 10, "--workers", 0, "-o", out, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def one_bad(tmp_path_factory):
    """200 JPEGs of which the one the first step reads is corrupt, a tiny model, and a plain 4-step run."""
    from dpcli.testing import invoke

    root = tmp_path_factory.mktemp("one-bad")
    first = read_order()[0]
    images = jpeg_folder(root / "images", corrupt={first})
    model = save_tiny_unet(root / "model")
    out = root / "plain"
    with one_thread():
        result = invoke(*finetune_args(model, images, out, "--json"))
    return model, images, out, first, result


# One corrupt JPEG among hundreds ----------------------------------------------------------------------


def test_one_corrupt_jpeg_among_hundreds_is_skipped_named_once_and_reported(one_bad):
    model, images, out, first, result = one_bad
    assert result.exit_code == 0, result.stderr
    name = str(images / f"img_{first:03d}.jpg")
    warnings = [line for line in result.stderr.splitlines() if "skipped a bad sample" in line]
    assert len(warnings) == 1 and name in warnings[0] and "Truncated File Read" in warnings[0]
    assert "1 bad sample(s) skipped" in result.stderr  # the progress line counts it
    assert result.json["bad_samples"] == [{"source": name, "reason": "Truncated File Read", "step": 1}]
    state = json.loads(sorted((out / "checkpoints").iterdir())[-1].joinpath("state.json").read_text())
    assert state["bad_samples"]["entries"][0][2] == name


def test_the_bad_image_is_replaced_by_the_next_good_one_whatever_the_workers(one_bad):
    _, images, _, first, _ = one_bad
    transform = ImageTransform(16, 3)
    runs = {}
    for workers in (0, 1):
        log = BadSampleLog(on_warning=lambda message: None)
        options = dict(seed=0, batch_size=4, steps=2, workers=workers, bad_samples=log)
        runs[workers] = list(training_batches(open_source(str(images)), transform, **options))
        assert [entry.to_json()["step"] for entry in log.entries] == [1]
    plain, forked = runs[0], runs[1]
    assert plain[0].indices[0] == first + 1  # the next file in the folder's order
    assert plain[0].indices[1:] == read_order()[1:4] and len(plain[0]) == 4  # the batch keeps its size
    for a, b in zip(plain, forked, strict=True):
        assert a.indices == b.indices and torch.equal(a.pixels, b.pixels)


@pytest.mark.slow
def test_a_run_killed_after_the_skip_resumes_to_the_same_weights_and_report(one_bad, tmp_path, dp):
    model, images, plain, _, uninterrupted = one_bad
    out = tmp_path / "killed"
    process = popen_dp(*finetune_args(model, images, out))
    wait_for(out / "checkpoints" / "step-00000002", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    result = dp(*finetune_args(model, images, out, "--resume", "--json"))
    assert result.exit_code == 0, result.stderr
    assert result.json["resumed_from"] >= 2
    assert_same_weights(final_weights(plain), final_weights(out))
    assert result.json["bad_samples"] == uninterrupted.json["bad_samples"]  # met before the kill


def test_fail_mode_exits_2_with_one_line_naming_the_file(one_bad, tmp_path, dp):
    model, images, _, first, _ = one_bad
    out = tmp_path / "out"
    result = dp(*finetune_args(model, images, out, "--on-bad-sample", "fail"))
    line = one_error_line(result, 2)
    assert f"unreadable image {images / f'img_{first:03d}.jpg'}: Truncated File Read" in line
    assert "Warning" not in result.stderr


# Mostly broken data: the cap ----------------------------------------------------------------------------


def test_three_percent_corrupt_exits_2_by_the_cap_after_a_checkpoint_and_resumes_with_a_higher_cap(
    tmp_path, dp
):
    corrupt = set(read_order()[4:10])  # 6 of 200 (3 %): met from step 2 on; the cap allows 2
    images = jpeg_folder(tmp_path / "images", corrupt=corrupt)
    model = save_tiny_unet(tmp_path / "model")
    out = tmp_path / "out"
    result = dp(*finetune_args(model, images, out, every=100))
    line = one_error_line(result, 2)
    assert "of 200 images are unreadable (over 1 %): first ones " in line
    assert str(images / f"img_{read_order()[4]:03d}.jpg") in line
    assert f"checkpoint written to {out / 'checkpoints'}" in line and "--max-bad-fraction" in line
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]
    resumed = dp(*finetune_args(model, images, out, "--resume", "--max-bad-fraction", "0.05", "--json"))
    assert resumed.exit_code == 0, resumed.stderr
    met = {Path(entry["source"]).name for entry in resumed.json["bad_samples"]}
    assert met == {f"img_{index:03d}.jpg" for index in corrupt}
    assert all(entry["step"] >= 2 for entry in resumed.json["bad_samples"])


def torchrun_dp(*args) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command = [*launcher, "-m", "dpcli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=600)


@pytest.mark.slow
def test_torchrun_processes_share_what_they_meet_and_stop_together(tmp_path, dp):
    model = save_tiny_unet(tmp_path / "model")
    order = read_order()
    # One bad image in the second process's rows: the report of rank 0 lists it, training equals one process.
    images = jpeg_folder(tmp_path / "one-bad", corrupt={order[2]})
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    result = dp(*finetune_args(model, images, single, "--json", *UNCLIPPED, steps=2))
    assert result.exit_code == 0, result.stderr
    proc = torchrun_dp(*finetune_args(model, images, parallel, "--json", *UNCLIPPED, steps=2, batch=2))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["bad_samples"] == result.json["bad_samples"] != []
    assert_equivalent_runs(single, parallel, steps=2)
    # Rows 4-7 (step 2) bad: each process meets two (the cap allows two of 200), together they meet four.
    images = jpeg_folder(tmp_path / "four-bad", corrupt=set(order[4:8]))
    out = tmp_path / "capped"
    proc = torchrun_dp(*finetune_args(model, images, out, every=100, batch=2))
    errors = {line for line in proc.stderr.splitlines() if line.startswith("Error: ")}
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr  # the same line from every process
    assert "of 200 images are unreadable (over 1 %)" in errors.pop()
    assert "dpcli/" not in proc.stderr  # no traceback of ours (torchrun prints its own summary)
    # rank 0 wrote it after a barrier in the cap handler, which rank 1 reached at the same batch
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]


def test_the_cap_counts_distinct_bad_examples_against_the_data_set():
    log = BadSampleLog(on_warning=lambda message: None)
    for index in range(4):  # 4 of 400 is 1 %, not over it, however early they are met
        log.record([(index, f"img_{index}", "broken")], "D", step=1)
        log.record([(index, f"img_{index}", "broken")], "D", step=7)  # met again: the same one
        log.check("D", 400, 0.01)
    assert len(log) == 4 and allowed_bad(400, 0.01) == 4
    log.record([(4, "img_4", "broken")], "D", step=2)
    with pytest.raises(TooManyBadSamples, match=r"5 of 400 images are unreadable \(over 1 %\)"):
        log.check("D", 400, 0.01)
    unknown = BadSampleLog(on_warning=lambda message: None)  # unknown length: only after 1,000 seen
    unknown.record([(i, f"row {i}", "broken") for i in range(20)], "S", seen=999)
    unknown.check("S", None, 0.01)
    with pytest.raises(TooManyBadSamples, match="20 of 1001 images read"):
        unknown.record([], "S", seen=2)
        unknown.check("S", None, 0.01)


def test_bad_sample_settings_are_checked_and_need_data(dp, tmp_path):
    with pytest.raises(BadSetting, match="on_bad_sample must be skip or fail"):
        DataSpec("D", on_bad_sample="ignore")
    with pytest.raises(BadSetting, match="max_bad_fraction needs data"):
        data_spec(None, max_bad_fraction=0.1)
    assert data_spec("D", on_bad_sample="fail").max_bad_fraction == 0.01
    result = dp("score", save_tiny_unet(tmp_path / "m"), "--data", "builtin:digits", "--on-bad-sample", "x")
    assert "--on-bad-sample must be skip or fail" in one_error_line(result, 2)


# Tar shards and Hugging Face datasets -----------------------------------------------------------------


def test_a_corrupt_member_of_a_tar_shard_is_skipped_in_calibration(dp, tmp_path, tiny_unet_folder):
    folder = captioned_folder(tmp_path / "images", count=8)
    shards = write_shards(folder, tmp_path / "shards", corrupt="sample0003")
    common = ["--calib-size", "8", "--timesteps", "3", "--json", "--max-bad-fraction", "0.2"]
    result = dp("score", tiny_unet_folder, "--data", shards, *common)
    assert result.exit_code == 0, result.stderr
    [entry] = result.json["bad_samples"]
    assert entry["source"] == f"sample0003 in {tmp_path / 'shards' / '0.tar'}" and entry["step"] is None
    assert entry["reason"] == "not an image PIL can identify"
    assert "skipped a bad sample sample0003" in result.stderr
    capped = dp("score", tiny_unet_folder, "--data", shards, "--calib-size", "8", "--timesteps", "3")
    assert "1 of 8 images are unreadable (over 1 %)" in one_error_line(capped, 2)


def test_a_broken_row_of_a_hugging_face_dataset_is_skipped_when_pruning(dp, tmp_path, tiny_unet_folder):
    import datasets

    rows = folder_rows(captioned_folder(tmp_path / "images", count=8))
    rows[5]["image"] = rows[5]["image"][:40]  # a PNG cut short
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    table = {"image": [{"bytes": r["image"], "path": None} for r in rows], "text": [r["text"] for r in rows]}
    datasets.Dataset.from_dict(table, features=features).save_to_disk(str(tmp_path / "hf"))
    result = dp(
        "prune", tiny_unet_folder, "--data", tmp_path / "hf", "--calib-size", "8", "--timesteps", "3",
        "--criterion", "diff-taylor", "--ratio", "0.3", "--max-bad-fraction", "0.2", "-o", tmp_path / "pruned", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    [entry] = result.json["bad_samples"]
    assert entry["source"].endswith("row 5 (image)") and entry["step"] is None
    metadata = json.loads((tmp_path / "pruned" / "dpcli.json").read_text())
    assert metadata["pruning"]["scores"]["bad_samples"] == [entry]


def test_the_fid_reference_skips_a_bad_image(dp, tmp_path, tiny_unet_folder, monkeypatch):
    from test_eval import fake_inception_weights

    weights = fake_inception_weights(tmp_path / "inception.pth", monkeypatch)
    images = jpeg_folder(tmp_path / "images", count=5, corrupt={2})
    fast = ["--steps", "2", "--num-samples", "2", "--no-latency", "--json", "--max-bad-fraction", "0.25"]
    result = dp("eval", tiny_unet_folder, *fast, "--data", images, "--inception-weights", weights)
    assert result.exit_code == 0, result.stderr
    assert result.json["bad_samples"] == [
        {"source": str(images / "img_002.jpg"), "reason": "Truncated File Read", "step": None}
    ]
    assert result.json["fid_info"]["reference_count"] == 5


# Images PIL opens but the pipeline cannot take as they are ----------------------------------------------


def odd_images(root: Path) -> Path:
    """One image of each awkward kind found in scraped data, all gray 128 or a known color."""
    root.mkdir(parents=True)
    Image.new("CMYK", (12, 12), (0, 255, 255, 0)).save(root / "cmyk.jpg")  # red
    Image.fromarray(np.full((12, 12), 32896, dtype=np.uint16)).save(root / "deep.png")  # 16-bit gray 128
    palette = Image.new("P", (12, 12), 1)
    palette.putpalette([0, 0, 0, 128, 128, 128] + [0] * 762)
    palette.save(root / "palette.png", transparency=0)
    Image.new("1", (12, 12), 1).save(root / "bilevel.png")
    Image.new("RGB", (1, 1), (128, 128, 128)).save(root / "one-pixel.png")
    frames = [Image.new("RGB", (12, 12), color) for color in ((128, 128, 128), (0, 0, 255))]
    frames[0].save(root / "animated.webp", save_all=True, append_images=frames[1:], lossless=True)
    Image.new("LA", (12, 12), (128, 255)).save(root / "gray-alpha.png")
    return root


def test_odd_image_modes_are_converted_and_train(dp, tmp_path, tiny_unet_folder):
    folder = odd_images(tmp_path / "odd")
    pixels = load_images(str(folder), size=8, channels=3)
    names = [p.name for p in sorted(folder.iterdir())]
    by_name = dict(zip(names, pixels, strict=True))
    gray = 128 / 127.5 - 1
    for name in ("deep.png", "palette.png", "one-pixel.png", "animated.webp", "gray-alpha.png"):
        assert torch.allclose(by_name[name], torch.full_like(by_name[name], gray), atol=0.02), name
    assert by_name["cmyk.jpg"][0].mean() > 0.9 and by_name["cmyk.jpg"][1:].mean() < -0.9  # red
    assert torch.equal(by_name["bilevel.png"], torch.ones_like(by_name["bilevel.png"]))
    out = tmp_path / "out"
    result = dp(
        "finetune", tiny_unet_folder, "--data", folder, "--steps", "1", "--batch-size", len(names),
        "--max-bad-fraction", "0", "--workers", "0", "-o", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.json["bad_samples"] == [] and "Warning" not in result.stderr


def test_a_file_that_is_no_image_fails_or_is_replaced_as_asked(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(folder / "good.png")
    (folder / "text.png").write_bytes(b"hello")
    named = f"unreadable image {folder / 'text.png'}: not an image PIL can identify"
    with pytest.raises(BadInput, match=named):
        load_images(DataSpec(str(folder), on_bad_sample="fail"), size=8, channels=3)
    pixels = load_images(DataSpec(str(folder), max_bad_fraction=0.5), size=8, channels=3)
    assert torch.equal(pixels[0], pixels[1])  # replaced by the next good one, wrapping round


def test_a_dataset_row_without_its_class_label_is_a_bad_sample(tmp_path):
    import datasets

    from dpcli.data import example_batches

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    table = {"image": [{"bytes": png.getvalue(), "path": None}] * 4, "label": [0, None, 1, 0]}
    datasets.Dataset.from_dict(table, features=features).save_to_disk(str(tmp_path / "hf"))
    source = open_source(DataSpec(str(tmp_path / "hf"), max_bad_fraction=0.25))
    source.check_labels(2)  # the rows that have one are in range; the other is met when it is read
    log = BadSampleLog(on_warning=lambda message: None)
    [batch] = example_batches(source, ImageTransform(8, 3), workers=0, bad_samples=log)
    assert batch.labels.tolist() == [0, 1, 1, 0] and batch.indices == [0, 2, 2, 3]
    assert [(entry.source, entry.reason) for entry in log.entries] == [
        (f"{tmp_path / 'hf'} row 1", "no class label in column 'label'")
    ]
