"""The data layer: image folders, Hugging Face datasets, tar shards and builtin:digits, read lazily through
one DataLoader path with the same batches whatever the source, the workers or the processes."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch

from dpcli.data import ImageTransform, load_images, open_source, training_batches
from dpcli.data.base import DataSpec
from dpcli.errors import BadInput
from dpcli.testing import make_image_folder


def test_builtin_digits_at_16px_in_range():
    images = load_images("builtin:digits", size=16, channels=1)
    assert images.shape == (1797, 1, 16, 16)
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.3


def test_folder_is_recursive_resized_and_scaled(image_folder):
    images = load_images(str(image_folder), size=16, channels=3)
    assert images.shape == (8, 3, 16, 16)
    assert images.min() >= -1 and images.max() <= 1
    gray = load_images(str(image_folder), size=8, channels=1, limit=3)
    assert gray.shape == (3, 1, 8, 8)


def test_unreadable_image_is_named(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", count=2)
    bad = folder / "class0" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(BadInput, match="broken.png"):
        load_images(str(folder), size=16, channels=3)


def test_empty_folder_and_unknown_builtin(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no images"):
        load_images(str(tmp_path / "empty"), size=16, channels=3)
    with pytest.raises(BadInput, match="unknown built-in dataset"):
        load_images("builtin:cifar", size=16, channels=3)


# Copies of one captioned, labelled image folder as a Hugging Face dataset and as tar shards ----------


def captioned_folder(root: Path, count: int = 10) -> Path:
    folder = make_image_folder(root, count=count, size=20)
    for index, image in enumerate(sorted(folder.rglob("*.png"))):
        image.with_suffix(".txt").write_text(f"caption {index}")
    return folder


def folder_rows(folder: Path) -> list[dict]:
    """The folder's examples in its order: PNG bytes, caption, class index."""
    source = open_source(str(folder))
    return [
        {"image": source.path(i).read_bytes(), "text": source.caption(i), "label": source.label(i)}
        for i in range(len(source))
    ]


def save_hf_copy(folder: Path, target: Path) -> Path:
    import datasets

    rows = folder_rows(folder)
    features = datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string"), "label": datasets.ClassLabel(2)}
    )
    table = {key: [row[key] for row in rows] for key in ("text", "label")}
    table["image"] = [{"bytes": row["image"], "path": None} for row in rows]
    dataset = datasets.Dataset.from_dict(table, features=features)
    datasets.DatasetDict({"train": dataset, "test": dataset.select(range(2))}).save_to_disk(str(target))
    return target


def write_shards(folder: Path, target: Path, per_shard: int = 4, corrupt: str | None = None) -> str:
    """Tar shards of the folder (``{0..N}.tar``) in webdataset's layout: KEY.png, KEY.txt, KEY.cls."""
    target.mkdir(parents=True, exist_ok=True)
    rows = folder_rows(folder)
    shards = [rows[i : i + per_shard] for i in range(0, len(rows), per_shard)]
    for number, shard in enumerate(shards):
        with tarfile.open(target / f"{number}.tar", "w") as archive:
            for offset, row in enumerate(shard):
                key = f"sample{number * per_shard + offset:04d}"
                image = b"corrupt" if key == corrupt else row["image"]
                for extension, data in (
                    ("png", image),
                    ("txt", row["text"].encode()),
                    ("cls", b"%d" % row["label"]),
                ):
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return str(target / f"{{0..{len(shards) - 1}}}.tar")


def batches_of(spec, steps: int = 3, **options) -> list:
    transform = ImageTransform(16, 3, crop=options.pop("crop", "center"), flip=options.pop("flip", False))
    options = {"seed": 0, "batch_size": 4, "steps": steps, "workers": 0, **options}
    return list(training_batches(open_source(spec), transform, **options))


def test_hf_dataset_and_tar_shards_give_the_folders_batches(tmp_path):
    folder = captioned_folder(tmp_path / "images")
    expected = batches_of(str(folder), flip=True, crop="random")
    hf = save_hf_copy(folder, tmp_path / "hf")
    shards = write_shards(folder, tmp_path / "shards")
    for spec in (DataSpec(str(hf), split="train"), shards):
        got = batches_of(spec, flip=True, crop="random")
        for mine, theirs in zip(got, expected, strict=True):
            assert torch.equal(mine.pixels, theirs.pixels)
            assert mine.captions == theirs.captions and torch.equal(mine.labels, theirs.labels)
    assert expected[0].captions[0].startswith("caption ") and expected[0].labels.tolist() != []


def test_workers_and_processes_decode_the_same_batches(tmp_path):
    folder = captioned_folder(tmp_path / "images")
    alone = batches_of(str(folder), flip=True, steps=2)
    with_workers = batches_of(str(folder), flip=True, steps=2, workers=2)
    assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(alone, with_workers, strict=True))
    # two processes of a global batch of 4: each decodes its half of every step, together the same rows
    halves = [batches_of(str(folder), flip=True, steps=2, batch_size=2, world_size=2, rank=r) for r in (0, 1)]
    for step, whole in enumerate(alone):
        assert torch.equal(torch.cat([halves[0][step].pixels, halves[1][step].pixels]), whole.pixels)
        assert halves[0][step].ids + halves[1][step].ids == whole.ids


def test_resumed_batches_continue_where_the_run_stopped(tmp_path):
    folder = make_image_folder(tmp_path / "images", count=6)
    whole = batches_of(str(folder), steps=5, flip=True)
    resumed = batches_of(str(folder), steps=5, flip=True, start_step=3)
    assert [b.ids for b in resumed] == [b.ids for b in whole[3:]]
    assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(resumed, whole[3:], strict=True))


def test_flip_flips_about_half_the_training_images_and_never_the_calibration_batch(tmp_path):
    from dpcli.scoring import calibration_batch
    from dpcli.testing import tiny_loaded

    folder = make_image_folder(tmp_path / "images", count=8, size=16)
    batches = batches_of(str(folder), steps=25, flip=True)  # 100 samples
    plain = load_images(str(folder), size=16, channels=3)
    flipped = 0
    for batch in batches:
        for row, (index, was_flipped) in enumerate(zip(batch.indices, batch.flipped, strict=True)):
            expected = plain[index].flip(-1) if was_flipped else plain[index]
            assert torch.equal(batch.pixels[row], expected)
            flipped += was_flipped
    assert 35 <= flipped <= 65
    assert not any(any(b.flipped) for b in batches_of(str(folder), steps=25, flip=False))
    loaded = tiny_loaded()
    x0, _ = calibration_batch(loaded, loaded.adapter, str(folder), 8, seed=0)
    chosen = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x0, plain[chosen])


def test_random_crop_takes_squares_of_the_resized_image(tmp_path):
    from PIL import Image

    (tmp_path / "wide").mkdir()
    pixels = torch.arange(40 * 20 * 3, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(20, 40, 3)
    Image.fromarray(pixels.numpy()).save(tmp_path / "wide" / "a.png")
    crops = {
        tuple(b.pixels[0, 0, 0, :3].tolist())
        for b in batches_of(str(tmp_path / "wide"), steps=12, batch_size=1, crop="random")
    }
    assert len(crops) > 3  # different offsets along the long side
    center = batches_of(str(tmp_path / "wide"), steps=3, batch_size=1)
    assert all(torch.equal(b.pixels, center[0].pixels) for b in center)


def test_caption_dropout_replaces_that_share_of_captions_with_the_empty_prompt(tmp_path):
    folder = captioned_folder(tmp_path / "images")
    captions = [c for b in batches_of(str(folder), steps=50, caption_dropout=0.3) for c in b.captions]
    assert 0.2 <= captions.count("") / len(captions) <= 0.4
    assert all(c.startswith("caption ") for c in captions if c)


@pytest.mark.slow
def test_hub_dataset_id_is_read_from_the_local_cache_offline(tmp_path, tiny_unet_folder):
    """``hf:NAME``: a Hub dataset as the Hugging Face cache holds it (a snapshot of parquet files), read
    by a fresh ``dp`` with HF_HUB_OFFLINE=1: no network."""
    import datasets

    from dpcli.testing import run_dp_subprocess

    folder = captioned_folder(tmp_path / "images", count=4)
    rows = folder_rows(folder)
    hub = tmp_path / "hf-home" / "hub"
    repo = hub / "datasets--someone--tiny-images"
    (repo / "snapshots" / ("a" * 40) / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    table = {"image": [{"bytes": r["image"], "path": None} for r in rows], "text": [r["text"] for r in rows]}
    parquet = repo / "snapshots" / ("a" * 40) / "data" / "train-00000-of-00001.parquet"
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(parquet))
    env = {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    common = ["--calib-size", "4", "--timesteps", "3", "--seed", "1", "--json"]
    from_hub = run_dp_subprocess(
        "score", tiny_unet_folder, "--data", "hf:someone/tiny-images", *common, env=env
    )
    assert from_hub.exit_code == 0, from_hub.stderr
    from_folder = run_dp_subprocess("score", tiny_unet_folder, "--data", folder, *common, env=env)
    assert from_hub.json["losses"] == from_folder.json["losses"]  # the same four images
    absent = run_dp_subprocess("score", tiny_unet_folder, "--data", "hf:someone/absent", *common, env=env)
    assert absent.exit_code == 2 and "someone/absent is not in the local Hugging Face cache" in absent.stderr


# Bad sources through the CLI: exit 2, one line naming the problem, nothing written ----------------------


def test_bad_sources_exit_2_naming_the_problem_and_write_nothing(dp, tmp_path, tiny_unet_folder):
    folder = captioned_folder(tmp_path / "images", count=6)
    hf = save_hf_copy(folder, tmp_path / "hf")
    empty = tmp_path / "empty-shards"
    empty.mkdir()
    with tarfile.open(empty / "0.tar", "w") as archive:
        info = tarfile.TarInfo("notes.json")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"{}"))
    corrupt = write_shards(folder, tmp_path / "corrupt-shards", corrupt="sample0003")
    (tmp_path / "not-a-tar.tar").write_bytes(b"\0" * 100 + b"garbage")
    cases = [
        (["--data", hf, "--caption-column", "prompt"], "no column 'prompt'"),
        (["--data", hf, "--split", "validation"], "no split 'validation'"),
        (["--data", str(empty / "0.tar")], "holds no samples"),
        (["--data", corrupt, "--batch-size", "6", "--on-bad-sample", "fail"], "sample0003"),
        (["--data", str(tmp_path / "not-a-tar.tar")], "not a readable tar shard"),
        (["--data", str(tmp_path / "shards" / "{0..3}.tar")], "shard not found"),
        (["--data", str(folder), "--split", "train"], "apply to Hugging Face datasets"),
    ]
    for options, message in cases:
        out = tmp_path / "out"
        result = dp("finetune", tiny_unet_folder, "--steps", "1", "--batch-size", "2", "-o", out, *options)
        assert result.exit_code == 2, (options, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (options, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not out.exists() or not any(out.iterdir()), options


@pytest.mark.slow
def test_finetune_on_a_dataset_or_shards_equals_finetune_on_the_folder(dp, tmp_path, tiny_unet_folder):
    from safetensors.torch import load_file

    folder = captioned_folder(tmp_path / "images", count=8)
    sources = {
        "folder": [str(folder)],
        "hf": [str(save_hf_copy(folder, tmp_path / "hf")), "--split", "train"],
        "shards": [write_shards(folder, tmp_path / "shards")],
    }
    trained = {}
    for name, data in sources.items():
        out = tmp_path / f"out-{name}"
        result = dp("finetune", tiny_unet_folder, "--data", *data, "--steps", "2", "--batch-size", "4",
                    "--flip", "--workers", "1", "-o", out, "--json")  # fmt: skip
        assert result.exit_code == 0, result.stderr
        trained[name] = load_file(out / "unet" / "raw.safetensors")
        assert result.json["data"] == data[0]
    for name in ("hf", "shards"):
        assert all(torch.equal(trained[name][k], v) for k, v in trained["folder"].items()), name


def test_digits_batches_are_the_in_memory_digits(tmp_path):
    from dpcli.data import builtin_digits

    images, labels = builtin_digits()
    batch = batches_of("builtin:digits", steps=1)[0]
    expected = load_images("builtin:digits", 16, 3)
    assert torch.equal(batch.pixels, expected[batch.indices])
    assert batch.labels.tolist() == [int(labels[i]) for i in batch.indices]


def test_dataset_options_without_data_are_refused(dp, tiny_unet_folder, tmp_path):
    for command in (["eval", tiny_unet_folder, "--num-samples", "2", "-o", tmp_path / "eval"],
                    ["score", tiny_unet_folder, "--criterion", "magnitude"]):  # fmt: skip
        result = dp(*command, "--split", "train")
        assert result.exit_code == 2 and "--split needs --data" in result.stderr, result.stderr
