"""Faults a long job meets, and what dp guarantees through each: a run killed at any moment resumes to the
same weights, a damaged checkpoint is skipped, a second writer of an output is stopped, a full disk at any
write leaves every output as it was, and a hostile config or a damaged model folder is refused before it
costs memory. Each case exits with its documented code and one line."""

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers.processes import assert_same_weights, one_thread, popen_dp, wait_for
from safetensors.torch import load_file, save_file

from dpcli.jobs.finetune.checkpoints import verify_checkpoint
from dpcli.testing import TINY_UNET_CONFIG


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


def finetune_args(model, data, out, *extra, steps=8, every=2, keep=3):
    return [
        "finetune", model, "--data", data, "--steps", steps, "--batch-size", 2, "--lr", "1e-3",
        "--checkpoint-every", every, "--keep-checkpoints", keep, "-o", out, *extra,
    ]  # fmt: skip


def one_error_line(result, code: int) -> str:
    """The run failed with ``code`` and said why in exactly one line (after any progress log); that line."""
    assert result.exit_code == code, (result.exit_code, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) with the SHA-256 of its content."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def leftovers(root: Path) -> list[str]:
    """Temporary files or folders and lock files a finished command must not leave behind."""
    return [
        str(p.relative_to(root))
        for p in root.rglob(".*")
        if p.name.endswith((".tmp", ".lock")) or ".tmp." in p.name or ".old-" in p.name
    ]


def final_weights(out: Path) -> dict:
    return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A tiny model, its training images and a plain 8-step fine-tune of it: the run faults must not change."""
    from dpcli.testing import invoke, make_image_folder, save_tiny_unet

    root = tmp_path_factory.mktemp("faults")
    model = save_tiny_unet(root / "model")
    images = make_image_folder(root / "images")
    out = root / "plain"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    result = invoke(*finetune_args(model, images, out))
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.stderr
    return model, images, out


# A run killed at any moment ---------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bit_exact(dp, tmp_path, uninterrupted):
    model, images, plain = uninterrupted
    out = tmp_path / "killed"
    process = popen_dp(*finetune_args(model, images, out))
    wait_for(out / "checkpoints" / "step-00000002", process)
    # Anywhere after the first checkpoint: inside a step, a checkpoint write or its rename, or the save.
    time.sleep(random.Random().uniform(0.0, 0.3))
    process.send_signal(signal.SIGKILL)
    process.wait()
    result = dp(*finetune_args(model, images, out, "--resume"))
    assert result.exit_code == 0, result.stderr
    assert_same_weights(final_weights(plain), final_weights(out))
    assert_same_weights(
        load_file(str(plain / "unet" / "raw.safetensors")), load_file(str(out / "unet" / "raw.safetensors"))
    )
    assert leftovers(tmp_path) == []


# A damaged checkpoint -----------------------------------------------------------------------------


def test_corrupt_newest_checkpoints_are_skipped_with_a_warning_and_resume_is_exact(
    dp, tmp_path, uninterrupted
):
    model, images, plain = uninterrupted
    out = tmp_path / "damaged"
    shutil.copytree(plain, out)
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "step-00000004",
        "step-00000006",
        "step-00000008",
    ]
    newest = checkpoints / "step-00000008" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated: what a full disk or a lost copy leaves
    flipped = checkpoints / "step-00000006" / "ema.safetensors"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one bit pattern changed: only the hash sees it
    flipped.write_bytes(bytes(data))

    result = dp(*finetune_args(model, images, out, "--resume", "--json"))
    assert result.exit_code == 0, result.stderr
    assert result.json["resumed_from"] == 4
    assert "step-00000008" in result.stderr and "step-00000006" in result.stderr
    assert "does not match its SHA-256" in result.stderr and "bytes" in result.stderr
    assert_same_weights(final_weights(plain), final_weights(out))


def test_resume_refuses_when_no_checkpoint_is_intact(dp, tmp_path, uninterrupted):
    model, images, plain = uninterrupted
    out = tmp_path / "ruined"
    shutil.copytree(plain, out)
    for folder in (out / "checkpoints").iterdir():
        (folder / "state.safetensors").write_bytes(b"not a checkpoint")
    before = tree(out)
    line = one_error_line(dp(*finetune_args(model, images, out, "--resume")), 2)
    assert "no intact checkpoint" in line and "--force" in line
    assert tree(out) == before


# Two writers, one output ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_writer_of_a_live_output_exits_2_naming_the_holder_even_with_force(
    dp, tmp_path, uninterrupted
):
    model, images, _ = uninterrupted
    out = tmp_path / "shared"
    live = popen_dp(*finetune_args(model, images, out, steps=100000, every=1, keep=1))
    try:
        wait_for(out / "checkpoints" / "step-00000002", live)
        for command in (
            finetune_args(model, images, out, "--force", steps=2),
            ["prune", model, "--criterion", "magnitude", "--ratio", "0.3", "-o", out, "--force"],
        ):
            line = one_error_line(dp(*command), 2)
            assert str(out) in line and f"process {live.pid}" in line, line
        assert live.poll() is None, "the live run goes on"
        assert any((out / "checkpoints").glob("step-*")), "its checkpoints are untouched"
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    # The killed run's lock file is left behind; the next run takes it over and says so.
    taken = dp(*finetune_args(model, images, out, "--force", steps=2))
    assert taken.exit_code == 0, taken.stderr
    assert f"left by process {live.pid}" in taken.stderr and "no longer running" in taken.stderr
    assert leftovers(tmp_path) == []


def test_what_a_killed_writer_left_beside_its_output_is_removed_by_the_next_run(dp, tmp_path, uninterrupted):
    model, _, _ = uninterrupted
    out = tmp_path / "report"
    args = ["eval", model, "--num-samples", 2, "--steps", 2, "--batch-size", 2, "--no-latency", "-o", out]
    assert dp(*args).exit_code == 0
    (tmp_path / ".report.lock").write_text("99999 elsewhere\n")  # its holder was killed: no flock on it
    (tmp_path / ".report.abcd1234.tmp").mkdir()  # an unfinished write
    (tmp_path / ".report.old-99999").mkdir()  # a replaced output never removed
    kept = tmp_path / ".report.wxyz9876.tmp" / "checkpoints"  # a fine-tune's result being moved in
    kept.mkdir(parents=True)
    result = dp(*args, "--force")
    assert result.exit_code == 0, result.stderr
    assert "left by process 99999 on elsewhere" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".report.wxyz9876.tmp"]
    assert "interrupted write" in result.stderr


# A full disk at every write ----------------------------------------------------------------------


class DiskFull:
    """Fault injection: every file write under ``root`` (Python's ``open`` for writing, safetensors'
    ``save_file``) is counted; the ``fail_at``-th raises ``OSError(ENOSPC)`` as a full disk would."""

    def __init__(self, root: Path, fail_at: int | None = None):
        self.root = str(root)
        self.fail_at = fail_at
        self.writes: list[str] = []

    def _write(self, path) -> None:
        path = os.fspath(path)
        if not path.startswith(self.root) or path.endswith(".lock"):
            return
        self.writes.append(Path(path).name)
        if len(self.writes) == self.fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    def install(self, monkeypatch) -> "DiskFull":
        import builtins
        import io

        import safetensors.torch

        real_open, real_save = builtins.open, safetensors.torch.save_file

        def open_(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and any(flag in mode for flag in "wax+"):
                self._write(file)
            return real_open(file, mode, *args, **kwargs)

        def save_file_(tensors, filename, *args, **kwargs):
            self._write(filename)
            return real_save(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)
        monkeypatch.setattr(safetensors.torch, "save_file", save_file_)
        return self


def disk_full_commands(model, images, work: Path) -> dict[str, tuple[list, Path]]:
    """For each command that writes: its arguments and the output they replace."""
    return {
        # TensorBoard's event writer flushes from a thread: its write points vary from run to run
        "finetune": (finetune_args(model, images, work / "tuned", "--force", "--report-to", "none", steps=2,
                                   every=2), work / "tuned"),
        "prune": (["prune", model, "--criterion", "magnitude", "--ratio", "0.3", "-o", work / "pruned",
                   "--force"], work / "pruned"),
        "score": (["score", model, "--criterion", "magnitude", "-o", work / "scores.safetensors"],
                  work / "scores.safetensors"),
        "eval": (["eval", model, "--num-samples", 2, "--steps", 2, "--batch-size", 2, "--no-latency", "-o",
                  work / "report", "--force"], work / "report"),
    }  # fmt: skip


@pytest.mark.parametrize("command", ["finetune", "prune", "score", "eval"])
@pytest.mark.slow
def test_disk_full_at_every_write_point_leaves_outputs_untouched(
    dp, tmp_path, uninterrupted, monkeypatch, command
):
    model, images, _ = uninterrupted
    args, output = disk_full_commands(model, images, tmp_path)[command]
    with monkeypatch.context() as patch:  # the write points, and the output a failed run must not touch
        counted = DiskFull(tmp_path).install(patch)
        assert dp(*args).exit_code == 0
    assert counted.writes, "the command writes files"
    before = tree(tmp_path)
    for point, name in enumerate(counted.writes, 1):
        with monkeypatch.context() as patch:
            DiskFull(tmp_path, fail_at=point).install(patch)
            result = dp(*args)
        line = one_error_line(result, 1)
        assert line.startswith(f"Error: no space left on the device writing {tmp_path}"), (name, line)
        after = tree(tmp_path)
        if command == "finetune":  # checkpoints (and metrics) written before the fault stay, each one intact
            live = ("tuned/checkpoints/", "tuned/metrics.jsonl")
            after = {k: v for k, v in after.items() if not k.startswith(live)}
            expected = {k: v for k, v in before.items() if not k.startswith(live)}
            for checkpoint in (output / "checkpoints").glob("*"):  # none when the fault came first
                verify_checkpoint(checkpoint)
            assert "with --resume" in line
        else:
            expected = before
        assert after == expected, f"ENOSPC writing {name} (write {point}) changed the outputs"
        assert leftovers(tmp_path) == [], f"ENOSPC writing {name} (write {point}) left temporaries"


# A hostile config, a damaged model folder ---------------------------------------------------------


def test_an_oversized_config_is_refused_before_allocation(dp, tmp_path):
    config = {
        **TINY_UNET_CONFIG,
        "_class_name": "UNet2DModel",
        "block_out_channels": [16384, 16384],
        "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"],
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    line = one_error_line(dp("inspect", tmp_path / "config.json"), 2)
    assert "parameters" in line and "GB" in line and "refused before allocating" in line


def test_max_params_guards_configs_from_outside(dp, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY_UNET_CONFIG, "_class_name": "UNet2DModel"}))
    line = one_error_line(dp("inspect", tmp_path / "config.json", "--max-params", 1000), 2)
    assert "more than the limit of 1,000" in line
    assert dp("inspect", tmp_path / "config.json", "--max-params", 10**8).exit_code == 0


@pytest.fixture(scope="module")
def pruned_folder(uninterrupted, tmp_path_factory) -> Path:
    from dpcli.testing import invoke

    model, _, _ = uninterrupted
    out = tmp_path_factory.mktemp("pruned") / "pruned"
    result = invoke("prune", model, "--criterion", "magnitude", "--ratio", "0.3", "-o", out)
    assert result.exit_code == 0, result.stderr
    return out


def _widths(folder: Path, change) -> None:
    info = json.loads((folder / "dpcli.json").read_text())
    name = next(n for n, spec in info["modules"].items() if spec["type"] == "Conv2d" and n.startswith("down"))
    change(info["modules"][name])
    (folder / "dpcli.json").write_text(json.dumps(info))


def _tensors(folder: Path, change) -> None:
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


MALFORMED = {
    "widths_that_do_not_match_the_weights": (
        lambda f: _widths(f, lambda spec: spec.update(out_channels=spec["out_channels"] + 8)),
        "do not fit",
    ),
    "a_negative_width": (
        lambda f: _widths(f, lambda spec: spec.update(in_channels=-3)),
        "expected a whole number >= 1",
    ),
    "a_huge_width": (
        lambda f: _widths(f, lambda spec: spec.update(out_channels=10**9)),
        "refused before allocating",
    ),
    "a_missing_tensor": (lambda f: _tensors(f, lambda t: t.pop("conv_out.bias")), "1 missing"),
    "an_extra_tensor": (lambda f: _tensors(f, lambda t: t.update(extra=torch.zeros(2))), "1 unexpected"),
}


@pytest.mark.parametrize("fault", list(MALFORMED))
def test_a_malformed_pruned_folder_is_refused_with_one_line(dp, tmp_path, pruned_folder, fault):
    damage, expected = MALFORMED[fault]
    folder = tmp_path / "damaged"
    shutil.copytree(pruned_folder, folder)
    damage(folder)
    before = tree(folder)
    line = one_error_line(dp("inspect", folder), 2)
    assert expected in line, line
    out = tmp_path / "tuned"
    one_error_line(dp("prune", folder, "--criterion", "magnitude", "--ratio", "0.2", "-o", out), 2)
    assert tree(folder) == before and not out.exists()
