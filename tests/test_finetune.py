"""`dp finetune`: it learns, stops cleanly on Ctrl-C (resuming after SIGKILL: test_faults.py), runs data-parallel
with the same result, writes only safe files, and refuses bad input with exit code 2."""

import json
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers.processes import SUBPROCESS_ENV, assert_same_weights, one_thread, popen_dp, wait_for
from safetensors.torch import load_file

from dpcli.loading import load_model
from dpcli.testing import TINY_UNET_CONFIG, make_image_folder, make_unet


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


def finetune_args(model, data, out, *extra, steps=6, batch=2, checkpoint_every=2):
    return [
        "finetune",
        model,
        "--data",
        data,
        "--steps",
        str(steps),
        "--batch-size",
        str(batch),
        "--lr",
        "1e-3",
        "--warmup",
        "2",
        "--checkpoint-every",
        str(checkpoint_every),
        "-o",
        out,
        *extra,
    ]


def weights(folder: Path, name: str = "diffusion_pytorch_model.safetensors") -> dict:
    return load_file(str(folder / "unet" / name))


def test_a_few_steps_lower_the_loss_and_the_result_is_a_model_every_command_takes(
    dp, tmp_path, tiny_unet_folder, image_folder
):
    out = tmp_path / "tuned"
    result = dp(*finetune_args(tiny_unet_folder, image_folder, out, "--json", steps=24, batch=4))
    assert result.exit_code == 0, result.stderr
    report = result.json
    assert report["steps"] == 24 and report["global_batch"] == 4
    assert report["final_loss"] < 0.7 * report["initial_loss"], report
    # EMA weights are the model, the raw weights ride along; the run is recorded in the history.
    reloaded = load_model(str(out))
    assert_same_weights(reloaded.model.state_dict(), weights(out))
    raw = weights(out, "raw.safetensors")
    assert raw.keys() == weights(out).keys()
    assert any(not torch.equal(raw[k], v) for k, v in weights(out).items())
    history = json.loads((out / "dpcli.json").read_text())["history"]
    assert history[-1]["step"] == "finetune" and history[-1]["steps"] == 24
    assert history[-1]["final_loss"] == pytest.approx(report["final_loss"])
    assert (out / "loss.png").stat().st_size > 0
    inspected = dp("inspect", out, "--json")
    assert inspected.exit_code == 0 and inspected.json["params"] == sum(v.numel() for v in raw.values())
    # Checkpoints: safetensors and JSON only, nothing a pickle loader would read.
    files = [p for p in (out / "checkpoints").rglob("*") if p.is_file()]
    assert files and {p.suffix for p in files} == {".safetensors", ".json"}
    for path in files:
        head = path.read_bytes()[:1]
        assert head != b"\x80" and not zipfile.is_zipfile(path), path
        if path.suffix == ".safetensors":
            assert load_file(str(path))
        else:
            assert json.loads(path.read_text())["format"] == "dpcli-checkpoint"


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_then_stops(tmp_path, tiny_unet_folder, image_folder):
    out = tmp_path / "out"
    process = popen_dp(*finetune_args(tiny_unet_folder, image_folder, out, steps=400))
    wait_for(out / "checkpoints" / "step-00000002", process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted at step" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    states = [json.loads(p.read_text()) for p in (out / "checkpoints").glob("step-*/state.json")]
    stopped_at = max(state["step"] for state in states)
    assert 2 <= stopped_at < 400
    assert not (out / "dpcli.json").exists()


# Equivalence of two training runs, stated for the maths rather than for one BLAS. Summation order differs
# between one process and two (all-reduce) or between one batch and accumulated micro-batches, so gradients
# agree to float rounding only. AdamW then divides by sqrt(v): an element whose gradient is near zero can
# flip its update from +lr to -lr on rounding alone. So: gradients (AdamW's first moment after step 1 is
# exactly (1 - beta1) * g) and losses must agree tightly; weights must agree within what AdamW's normalised
# step allows, and all but a few elements must agree to rounding.


# Clipping to a norm would hide a gradient off by a constant factor (a missing average, say).
UNCLIPPED = ("--grad-clip", "0")


def checkpoint(out: Path, step: int) -> tuple[dict, dict]:
    folder = out / "checkpoints" / f"step-{step:08d}"
    return load_file(str(folder / "state.safetensors")), json.loads((folder / "state.json").read_text())


def adam_update_bound(step: int, beta1: float, beta2: float) -> float:
    """The largest |m_hat / sqrt(v_hat)| Adam can produce at ``step`` for any gradient history
    (Cauchy-Schwarz over the bias-corrected moment weights); one step moves a weight by at most lr times this."""
    first = [(1 - beta1) * beta1 ** (step - i) / (1 - beta1**step) for i in range(1, step + 1)]
    second = [(1 - beta2) * beta2 ** (step - i) / (1 - beta2**step) for i in range(1, step + 1)]
    return sum(a * a / b for a, b in zip(first, second, strict=True)) ** 0.5


def assert_equivalent_runs(a: Path, b: Path, steps: int) -> None:
    state_a, meta = checkpoint(a, steps)
    state_b, _ = checkpoint(b, steps)
    # Losses: step 1 starts from identical weights and data; later steps from weights within the bound.
    losses_a, losses_b = state_a["history.loss"], state_b["history.loss"]
    torch.testing.assert_close(losses_b[0], losses_a[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(losses_b, losses_a, rtol=1e-4, atol=0)
    # Gradients of step 1, before anything nonlinear in the optimizer: exp_avg = (1 - beta1) * g.
    first_a, _ = checkpoint(a, 1)
    first_b, _ = checkpoint(b, 1)
    moments = [key for key in first_a if key.endswith(".exp_avg")]
    assert moments and moments == [key for key in first_b if key.endswith(".exp_avg")]
    gradient_a = torch.cat([first_a[key].double().flatten() for key in moments])
    gradient_b = torch.cat([first_b[key].double().flatten() for key in moments])
    # One scale for all: some gradients are zero in exact arithmetic (biases feeding a GroupNorm) and
    # only rounding noise here, so a per-tensor relative tolerance would compare noise with noise.
    scale = gradient_a.abs().max().item()
    torch.testing.assert_close(gradient_b, gradient_a, rtol=1e-4, atol=1e-6 * scale)
    assert (gradient_b - gradient_a).norm() <= 1e-5 * gradient_a.norm()
    # Weights (raw and EMA): each element within 2 * sum_t lr_t * bound_t, nearly all within rounding.
    beta1, beta2 = meta["optimizer_param_groups"][0]["betas"]
    lrs = state_a["history.lr"].tolist()
    allowed = 2 * sum(lr * adam_update_bound(t, beta1, beta2) for t, lr in enumerate(lrs, start=1))
    for name in ("diffusion_pytorch_model.safetensors", "raw.safetensors"):
        one, two = weights(a, name), weights(b, name)
        assert one.keys() == two.keys()
        differences = torch.cat([(two[key].double() - one[key].double()).abs().flatten() for key in one])
        references = torch.cat([one[key].double().abs().flatten() for key in one])
        assert differences.max().item() <= allowed * (1 + 1e-6), (name, differences.max().item(), allowed)
        beyond_rounding = (differences > 1e-5 + 1e-4 * references).double().mean().item()
        assert beyond_rounding < 1e-3, (name, beyond_rounding)


@pytest.mark.slow
def test_two_processes_with_gloo_equal_one_process_with_the_same_global_batch(
    dp, tmp_path, tiny_unet_folder, image_folder
):
    every_step = {"steps": 3, "checkpoint_every": 1}
    keep = ("--json", "--keep-checkpoints", "3", *UNCLIPPED)
    single = tmp_path / "single"
    result = dp(*finetune_args(tiny_unet_folder, image_folder, single, *keep, batch=4, **every_step))
    assert result.exit_code == 0, result.stderr
    parallel = tmp_path / "parallel"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args = finetune_args(tiny_unet_folder, image_folder, parallel, *keep, batch=2, **every_step)
    proc = subprocess.run(
        [*torchrun, "-m", "dpcli", *map(str, args)], capture_output=True, text=True, env=SUBPROCESS_ENV
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # rank 0 alone prints
    assert report["world_size"] == 2 and report["global_batch"] == 4
    assert_equivalent_runs(single, parallel, steps=3)


def test_gradient_accumulation_equals_a_larger_batch(dp, tmp_path, tiny_unet_folder, image_folder):
    every_step = {"steps": 2, "checkpoint_every": 1}
    large = tmp_path / "large"
    accumulated = tmp_path / "accumulated"
    large_args = finetune_args(tiny_unet_folder, image_folder, large, *UNCLIPPED, batch=4, **every_step)
    assert dp(*large_args).exit_code == 0
    args = finetune_args(
        tiny_unet_folder, image_folder, accumulated, *UNCLIPPED, "--grad-accum", "2", batch=2, **every_step
    )
    assert dp(*args).exit_code == 0
    assert_equivalent_runs(large, accumulated, steps=2)


def test_distillation_from_a_teacher_and_reinit(dp, tmp_path, tiny_unet_folder, image_folder):
    out = tmp_path / "distilled"
    result = dp(
        *finetune_args(tiny_unet_folder, image_folder, out, "--teacher", tiny_unet_folder, "--json", steps=2)
    )
    assert result.exit_code == 0, result.stderr
    assert result.json["teacher"] == str(tiny_unet_folder) and result.json["distill_weight"] == 1.0
    scratch = tmp_path / "scratch"
    args = finetune_args(tiny_unet_folder, image_folder, scratch, "--reinit", "--lr", "1e-9", steps=1)
    assert dp(*args).exit_code == 0
    original = make_unet().state_dict()
    raw = weights(scratch, "raw.safetensors")
    changed = [k for k in original if k.endswith("conv1.weight") and not torch.allclose(raw[k], original[k])]
    assert changed, "--reinit starts from fresh weights"
    assert json.loads((scratch / "dpcli.json").read_text())["history"][-1]["reinit"] is True


@pytest.fixture
def other_model_folder(tmp_path) -> Path:
    folder = tmp_path / "other"
    make_unet({**TINY_UNET_CONFIG, "block_out_channels": [16, 32]}).save_pretrained(folder)
    return folder


def test_bad_input_exits_2(dp, tmp_path, tiny_unet_folder, image_folder, other_model_folder):
    def fails(*args, message):
        result = dp(*args)
        assert result.exit_code == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
        return result

    out = tmp_path / "out"
    fails(*finetune_args(tiny_unet_folder, image_folder, out, steps=0), message="--steps must be at least 1")
    fails(*finetune_args(tiny_unet_folder, image_folder, out, batch=9), message="larger than the data")
    broken = make_image_folder(tmp_path / "broken", count=2)
    (broken / "class0" / "bad.png").write_bytes(b"not a png")
    fails(*finetune_args(tiny_unet_folder, broken, out), message="bad.png")
    fails(*finetune_args(tiny_unet_folder, image_folder, out, "--resume"), message="no checkpoint")
    fails(
        *finetune_args(tiny_unet_folder, image_folder, out, "--precision", "fp16", "--device", "cpu"),
        message="fp16 needs a CUDA GPU",
    )
    fails("finetune", tiny_unet_folder, "--steps", "2", "-o", out, message="--data is required")
    wide_teacher = tmp_path / "wide-teacher"
    make_unet({**TINY_UNET_CONFIG, "out_channels": 6}).save_pretrained(wide_teacher)
    fails(
        *finetune_args(tiny_unet_folder, image_folder, out, "--teacher", wide_teacher),
        message="same output shape",
    )
    assert not out.exists(), "nothing is written when the input is bad"

    assert dp(*finetune_args(tiny_unet_folder, image_folder, out, steps=2)).exit_code == 0
    fails(*finetune_args(other_model_folder, image_folder, out, "--resume", steps=4), message="another model")
    reseeded = tmp_path / "reseeded"
    make_unet(seed=1).save_pretrained(reseeded)
    fails(*finetune_args(reseeded, image_folder, out, "--resume", steps=4), message="other weights")
    fails(
        *finetune_args(tiny_unet_folder, image_folder, out, "--resume", "--seed", "3", steps=4),
        message="seed",
    )
    fails(*finetune_args(tiny_unet_folder, image_folder, out, steps=2), message="add --resume to continue")


def test_builtin_digits_model_is_trained_and_config_stays_random(dp):
    from dpcli.data import load_images
    from dpcli.io.model_format import module_shapes

    trained = load_model("builtin:ddpm-digits")
    untrained = load_model("config:ddpm-digits")
    assert module_shapes(trained.model) == module_shapes(untrained.model)
    assert trained.record["history"][-1]["step"] == "finetune"
    # The trained model predicts the noise on real digits far better than random weights do.
    x0 = load_images("builtin:digits", size=16, channels=1, limit=32)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    timesteps = torch.full((32,), 300)
    noisy = trained.scheduler.add_noise(x0, noise, timesteps)
    with torch.no_grad():
        errors = [torch.mean((m.model(noisy, timesteps).sample - noise) ** 2) for m in (trained, untrained)]
    assert errors[0] < 0.2 < errors[1]
    assert dp("inspect", "builtin:ddpm-digits", "--json").json["params"] == 1_112_801
    assert dp("inspect", "builtin:no-such-model").exit_code == 2


def test_the_report_prints_the_run_and_the_files_written(tmp_path):
    from dpcli.jobs.finetune.loop import FinetuneReport

    values = {**dict.fromkeys(FinetuneReport.__dataclass_fields__, 1), "settings": {"seed": 3}}
    printed = FinetuneReport(**values).to_json(output=tmp_path / "tuned", preview=True)
    assert list(printed)[-4:] == ["output", "loss_curve", "samples", "checkpoints"]
    assert printed["steps"] == 1 and printed["seed"] == 3 and "settings" not in printed
    assert printed["loss_curve"] == str(tmp_path / "tuned" / "loss.png")
    assert printed["checkpoints"] == str(tmp_path / "tuned" / "checkpoints")
    assert FinetuneReport(**values).to_json(output=tmp_path)["samples"] is None


def test_the_settings_marked_in_the_dataclass_are_the_ones_reported_kept_and_checked_on_resume(tmp_path):
    import dataclasses

    from dpcli.jobs.finetune import checkpoints
    from dpcli.jobs.finetune.loop import FinetuneReport, history_entry, reported_settings
    from dpcli.jobs.finetune.settings import FinetuneSettings

    settings = FinetuneSettings(data="builtin:digits", steps=3, lr=1e-3, flip=True)
    reported = reported_settings(settings, None, 0.0)
    assert list(reported) == list(FinetuneSettings.marked("report"))
    assert reported["lr"] == 1e-3 and reported["flip"] is True and reported["distill_weight"] is None
    assert {"lr", "seed", "crop", "caption_dropout"} <= set(FinetuneSettings.marked("resume"))
    assert "checkpoint_every" not in FinetuneSettings.marked("report")
    assert set(checkpoints._RESUME_KEYS) == {*FinetuneSettings.marked("resume"), "global_batch"}
    facts = {f.name: 1 for f in dataclasses.fields(FinetuneReport) if f.name != "settings"}
    report = FinetuneReport(**facts, settings=reported)
    entry = history_entry(report)
    assert set(reported) <= set(entry) and entry["steps"] == 1 and "loss_window" not in entry
    assert set(reported) <= set(report.to_json(output=tmp_path))
