"""Watching a long fine-tune: OUT/metrics.jsonl holds every step once (across kill -9 and --resume), TensorBoard
holds the loss series and the validation grids, validation writes its grids and scores and never changes
the weights a run ends with, and a tracker that is not installed is refused with one line."""

import importlib.machinery
import json
import random
import signal
import sys
import time
import types
from pathlib import Path

import pytest
import test_faults
import test_ldm
from helpers.processes import assert_same_weights, popen_dp, wait_for
from safetensors.torch import load_file
from test_faults import final_weights, finetune_args, one_error_line

from dpcli.jobs.finetune.monitor import read_metrics

# test_faults' fixtures: one thread (bit-exact comparisons), and its plain 8-step run of a tiny model
single_thread = test_faults.single_thread
uninterrupted = test_faults.uninterrupted
built = test_ldm.built  # tiny latent pipelines (text- and class-conditional) and captioned images


def tensorboard_events(out: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def test_a_resumed_runs_purge_holds_even_when_its_event_file_would_sort_first(tmp_path):
    """A resume within the same second as the killed run's first event, from a process with a smaller pid
    (an in-process resume, say): TensorBoard still drops the killed run's steps after the checkpoint."""
    from dpcli.jobs.finetune.monitor import TensorBoardTracker

    killed = TensorBoardTracker(tmp_path, 0, {"lr": 1e-4})
    for step in range(1, 5):
        killed.log(step, {"train/loss": 1.0})
    killed.close()
    (event_file,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    second, host = event_file.name.split(".")[3:5]
    event_file.rename(event_file.with_name(f"events.out.tfevents.{second}.{host}.99999999.0"))
    resumed = TensorBoardTracker(tmp_path, 2, {"lr": 1e-4})
    for step in range(3, 9):
        resumed.log(step, {"train/loss": 2.0})
    resumed.close()
    scalars = tensorboard_events(tmp_path).Scalars("train/loss")
    assert [(event.step, event.value) for event in scalars] == [(1, 1.0), (2, 1.0)] + [
        (s, 2.0) for s in range(3, 9)
    ]


@pytest.mark.slow
def test_metrics_hold_every_step_once_across_kill_and_resume(dp, tmp_path, uninterrupted):
    model, images, plain = uninterrupted
    out = tmp_path / "killed"
    process = popen_dp(*finetune_args(model, images, out))
    wait_for(out / "checkpoints" / "step-00000002", process)
    time.sleep(random.Random().uniform(0.0, 0.3))
    process.send_signal(signal.SIGKILL)
    process.wait()
    result = dp(*finetune_args(model, images, out, "--resume"))
    assert result.exit_code == 0, result.stderr

    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    # every line is a whole record (a line the kill cut short was dropped on resume)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 8
    plain_losses = [r["loss"] for r in read_metrics(plain / "metrics.jsonl")]
    assert [r["loss"] for r in records] == plain_losses  # the same run, step for step
    assert {"loss", "lr", "grad_norm", "images_per_second", "seconds"} <= records[0].keys()
    # TensorBoard drops what the killed run logged after the checkpoint it resumed from
    assert [event.step for event in tensorboard_events(out).Scalars("train/loss")] == list(range(1, 9))


def test_validation_grids_reach_tensorboard_and_never_change_the_weights(dp, tmp_path, uninterrupted):
    model, images, plain = uninterrupted
    out = tmp_path / "validated"
    args = finetune_args(model, images, out, "--validate-every", 3, "--validation-samples", 4)
    result = dp(*args)
    assert result.exit_code == 0, result.stderr

    # validated at steps 3 and 6 and at the end (8): the grids, the records and the tracker agree
    for step in (3, 6, 8):
        assert (out / "validation" / f"step-{step}.png").is_file()
    validated = {r["step"]: r["validation"] for r in read_metrics(out / "metrics.jsonl") if "validation" in r}
    assert sorted(validated) == [3, 6, 8]
    assert validated[3]["grid"] == "validation/step-3.png" and validated[3]["samples"] == 4
    events = tensorboard_events(out)
    assert [event.step for event in events.Scalars("train/loss")] == list(range(1, 9))
    assert [event.step for event in events.Images("validation/samples")] == [3, 6, 8]
    assert "## Training curves" in (out / "README.md").read_text()

    assert_same_weights(final_weights(plain), final_weights(out))
    raw = "unet/raw.safetensors"
    assert_same_weights(load_file(str(plain / raw)), load_file(str(out / raw)))


def test_validation_on_digits_records_a_small_sample_fid_under_its_protocol(dp, tmp_path):
    from dpcli.testing import TINY_UNET_CONFIG, save_tiny_unet

    model = save_tiny_unet(
        tmp_path / "gray", config={**TINY_UNET_CONFIG, "in_channels": 1, "out_channels": 1}
    )
    out = tmp_path / "out"
    result = dp(
        "finetune", model, "--data", "builtin:digits", "--steps", 2, "--batch-size", 4, "--validate-every", 2,
        "--validation-samples", 8, "--report-to", "none", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    (record,) = [r for r in read_metrics(out / "metrics.jsonl") if "validation" in r]
    assert record["step"] == 2 and record["validation"]["fid"] > 0
    protocol = json.loads((out / "validation" / "protocol.json").read_text())
    assert protocol["feature_network"] == "dpcli-digits"
    assert protocol["num_samples"] == 8 and protocol["steps"] == 50 and protocol["reference_count"] == 1797
    assert not (out / "tensorboard").exists()


def test_report_to_wandb_without_wandb_is_refused_with_one_line(dp, tmp_path, uninterrupted, monkeypatch):
    import importlib.util

    model, images, _ = uninterrupted
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a)
    )
    out = tmp_path / "out"
    line = one_error_line(dp(*finetune_args(model, images, out, "--report-to", "wandb")), 2)
    assert "--report-to wandb needs the wandb package" in line
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, says",
    [
        (
            ["--validation-prompt", "a cat", "--validate-every", "2"],
            "--validation-prompt applies to text-conditional",
        ),
        (["--validation-prompt", "a cat"], "--validation-prompt is used with --validate-every"),
        (["--report-to", "mlflow"], "--report-to must be one of none, tensorboard, wandb"),
        (["--validate-every", "-1"], "--validate-every must be 0 (off) or more"),
    ],
)
def test_bad_watch_options_exit_2_with_one_line(dp, tmp_path, uninterrupted, extra, says):
    model, images, _ = uninterrupted
    out = tmp_path / "out"
    line = one_error_line(dp(*finetune_args(model, images, out, *extra)), 2)
    assert says in line
    assert not out.exists()


class FakeWandb:
    """Stands in for the wandb package: records what dp asks of it (W&B is optional and not installed here)."""

    def __init__(self):
        self.module = types.ModuleType("wandb")
        self.module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.module.util = types.SimpleNamespace(generate_id=lambda: "run123")
        self.module.init = self.init
        self.module.Image = lambda pixels, caption=None: ("image", pixels.shape, caption)
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **options):
        self.inits.append(options)
        return types.SimpleNamespace(
            log=lambda values, step: self.logged.append((step, values)), finish=self.finish
        )

    def finish(self):
        self.finished += 1


def test_report_to_wandb_logs_offline_into_out_and_a_resume_continues_the_same_run(
    dp, tmp_path, uninterrupted, monkeypatch
):
    model, images, _ = uninterrupted
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake.module)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "out"
    watch = ("--report-to", "wandb", "--validate-every", 4, "--validation-samples", 2)
    result = dp(*finetune_args(model, images, out, *watch, steps=4))
    assert result.exit_code == 0, result.stderr
    (options,) = fake.inits
    assert options["mode"] == "offline" and options["dir"] == str(out) and options["id"] == "run123"
    assert options["config"]["validate_every"] == 4 and fake.finished == 1
    assert [step for step, values in fake.logged if "train/loss" in values] == [1, 2, 3, 4]
    assert [step for step, values in fake.logged if "validation/samples" in values] == [4]
    assert not (out / "tensorboard").exists() and (out / "wandb" / "dpcli-run-id").read_text() == "run123"

    fake.module.util.generate_id = lambda: "another"
    result = dp(*finetune_args(model, images, out, *watch, "--resume", steps=6))
    assert result.exit_code == 0, result.stderr
    assert fake.inits[-1]["id"] == "run123" and fake.inits[-1]["resume"] == "allow"
    assert [step for step, values in fake.logged if "validation/samples" in values] == [4, 6]


@pytest.mark.slow
def test_text_and_class_models_validate_with_their_prompts_and_classes(dp, tmp_path, built):
    out = tmp_path / "text"
    watch = ("--validate-every", 2, "--validation-samples", 4, "--report-to", "none", "--workers", 0)
    refused = dp("finetune", built["sd"], "--data", built["images"], "--steps", 2, *watch, "-o", out)
    assert "needs at least one --validation-prompt" in one_error_line(refused, 2)
    result = dp("finetune", built["sd"], "--data", built["images"], "--steps", 2, "--batch-size", 2, *watch,
                "--validation-prompt", "a red square", "--validation-prompt", "a blue circle", "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    protocol = json.loads((out / "validation" / "protocol.json").read_text())
    assert protocol["conditioning"] == "text" and protocol["prompts"]["count"] == 2
    assert protocol["fid_unavailable"] and protocol["clip_unavailable"]  # no Inception or CLIP weights here
    assert (out / "validation" / "step-2.png").is_file()

    out = tmp_path / "class"
    result = dp("finetune", built["class"], "--data", built["images"], "--steps", 2, "--batch-size", 2, *watch,
                "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    protocol = json.loads((out / "validation" / "protocol.json").read_text())
    assert protocol["conditioning"] == "class" and protocol["class_labels"] == [0, 1, 2]


def test_a_full_disk_under_the_tracker_is_one_line_and_the_run_resumes(
    dp, tmp_path, uninterrupted, monkeypatch
):
    import errno

    from dpcli.jobs.finetune import monitor

    model, images, plain = uninterrupted
    out = tmp_path / "out"
    log = monitor.TensorBoardTracker.log

    def full_at_step_5(self, step, scalars):
        if step == 5:  # TensorBoard's writer thread raises a failed write at the next call
            raise OSError(errno.ENOSPC, "No space left on device")
        log(self, step, scalars)

    with monkeypatch.context() as patch:
        patch.setattr(monitor.TensorBoardTracker, "log", full_at_step_5)
        line = one_error_line(dp(*finetune_args(model, images, out)), 1)
    assert line.startswith(f"Error: no space left on the device writing {out}") and line.endswith("--resume")
    assert dp(*finetune_args(model, images, out, "--resume")).exit_code == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 9))
    assert_same_weights(final_weights(plain), final_weights(out))
