"""dp score / dp prune with bf16 weights (--weights-dtype bf16): the scan's noise levels and its float32
gradient sum (--grad-sum-dtype), measured against float32 weights (benchmarks/bf16_scores.py)."""

import json

import pytest
import torch
from helpers.processes import DIGITS_SCAN, run_dp
from helpers.scan import calibration

import dpcli
from dpcli.plugins import get_registry
from dpcli.scoring import Float32GradientSum, accumulate_gradients
from dpcli.testing import tiny_loaded


def bf16_loaded():
    loaded = tiny_loaded()
    loaded.model.to(torch.bfloat16)
    return loaded


def test_bf16_weights_see_the_float32_noise_levels(monkeypatch):
    """The model gets add_noise computed in float32 and cast: in bf16, ᾱ_0 rounds to 1 and x_0 = x0 (no
    noise at all), which is what the scan of bf16 weights used to train its gradients on."""
    loaded = bf16_loaded()
    adapter = get_registry().adapter("ddpm")
    x0, noise = (tensor.to(torch.bfloat16) for tensor in calibration())  # as prepare_batch gives them
    seen = []
    predict = adapter.predict

    def spy(loaded, sample, timesteps, conditioning=None):
        seen.append((sample.detach().clone(), timesteps.clone()))
        return predict(loaded, sample, timesteps, conditioning)

    monkeypatch.setattr(adapter, "predict", spy)
    accumulate_gradients(loaded, adapter, x0, noise, 0.0, timesteps=3, chunk=1, precision="bf16")
    scheduler = loaded.scheduler
    for sample, timesteps in seen:
        assert sample.dtype == torch.bfloat16
        expected = scheduler.add_noise(x0.float(), noise.float(), timesteps).to(torch.bfloat16)
        assert torch.equal(sample, expected)
        assert not torch.equal(sample, x0)  # the bf16 add_noise left x0 unchanged at t = 0
    assert [int(t[0]) for _, t in seen] == [0, 1, 2]


def _ranks(values: torch.Tensor) -> torch.Tensor:
    return values.argsort().argsort().double()


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a) - (len(a) - 1) / 2, _ranks(b) - (len(b) - 1) / 2
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _pruned(scores, ratio: float) -> dict[str, set[int]]:
    report = dpcli.prune(dpcli.load("builtin:ddpm-digits"), scores=scores, ratio=ratio).report
    widths = {
        row["name"]: row["original_out_channels"] for row in report.layers if row.get("original_out_channels")
    }
    return {m: set(range(widths[m])) - set(s["out"]) for m, s in report.kept_channels.items() if "out" in s}


def test_bf16_weight_scores_pick_the_channels_of_float32_autocast():
    """Diff-Taylor on the trained digits model over its first 30 timesteps (where the bf16 noise levels
    were wrong): bf16 weights give the scores and pruned channels of float32 weights under the same bf16
    autocast, as benchmarks/bf16_scores.py measured (Spearman 0.999 per group; the bf16 add_noise gave
    0.86 and a pruned set 16 % different)."""
    common = dict(data="builtin:digits", threshold=0.0, timesteps=30, chunk=1, calib_size=4, precision="bf16")
    wide = dpcli.score(dpcli.load("builtin:ddpm-digits"), "diff-taylor", **common)
    half = dpcli.score(dpcli.load("builtin:ddpm-digits", weights_dtype="bf16"), "diff-taylor", **common)
    assert half.settings["grad_sum_dtype"] == "fp32"
    assert half.losses == pytest.approx(wide.losses, rel=0.02)
    correlations = [_spearman(wide.tensors[k].double(), half.tensors[k].double()) for k in wide.tensors]
    assert sum(correlations) / len(correlations) > 0.99 and min(correlations) > 0.97
    reference, pruned = _pruned(wide, 0.3), _pruned(half, 0.3)
    common_channels = sum(len(reference[m] & pruned.get(m, set())) for m in reference)
    assert common_channels / sum(len(channels) for channels in reference.values()) > 0.95


def test_float32_sum_never_holds_a_bf16_gradient_set(monkeypatch):
    """grad_sum_dtype fp32 (the default): every fresh bf16 .grad goes into a float32 buffer and is freed at
    once, so no other parameter holds a .grad while one is added; .grad ends as the float32 sum of the
    bf16 increments, cast once; the "weights" sum stays in bf16 .grad and differs from it."""
    adapter = get_registry().adapter("ddpm")
    x0, noise = (tensor.to(torch.bfloat16) for tensor in calibration())
    loaded = bf16_loaded()
    parameters = list(loaded.model.parameters())
    holding, exact = [], {}
    add = Float32GradientSum._add

    def spy(self, parameter):
        holding.append(sum(p.grad is not None for p in parameters))
        exact[parameter] = exact.get(parameter, 0) + parameter.grad.double()
        add(self, parameter)
        assert all(total.dtype == torch.float32 for total in self.sums.values())

    monkeypatch.setattr(Float32GradientSum, "_add", spy)
    scan = accumulate_gradients(loaded, adapter, x0, noise, 0.0, timesteps=24, chunk=2, precision="bf16")
    assert len(holding) == len(parameters) * scan.forward_passes == len(parameters) * 12
    assert max(holding) == 1  # only the parameter being added
    assert all(parameter.grad.dtype == torch.bfloat16 for parameter in parameters)
    narrow = bf16_loaded()
    accumulate_gradients(
        narrow, adapter, x0, noise, 0.0, timesteps=24, chunk=2, precision="bf16", grad_sum_dtype="weights"
    )
    truth = torch.cat([exact[p].flatten() for p in parameters])
    wide_error = (torch.cat([p.grad.double().flatten() for p in parameters]) - truth).norm() / truth.norm()
    narrow_grads = torch.cat([p.grad.double().flatten() for p in narrow.model.parameters()])
    narrow_error = (narrow_grads - truth).norm() / truth.norm()
    assert wide_error <= 2**-8  # one rounding to bf16 at the end
    assert narrow_error > 2 * wide_error  # a rounding at every one of the 12 additions


def test_float32_sum_does_not_stagnate():
    """1000 equal increments of 0.001: bf16 stops adding at 0.5 (an increment under half a unit of the
    last place rounds away), the float32 sum reaches 1."""
    for sum_dtype in ("fp32", "weights"):
        model = torch.nn.Linear(4, 1, bias=False).to(torch.bfloat16)
        accumulator = Float32GradientSum.attach(model) if sum_dtype == "fp32" else None
        for _ in range(1000):
            model.weight.sum().mul(0.001).backward()
        total = accumulator.sums[model.weight] if accumulator else model.weight.grad.float()
        assert total.mean().item() == pytest.approx(1.0 if sum_dtype == "fp32" else 0.5, rel=2e-3)
    assert Float32GradientSum.attach(torch.nn.Linear(4, 1)) is None  # float32 weights: nothing to do


def test_squared_gradients_and_stride_with_the_float32_sum():
    """The squared variant sums g⊙g in float32, stride scaling applies to the float32 sum; both end in the
    weights' dtype in .grad; float32 weights give the same result with either setting, bit for bit."""
    adapter = get_registry().adapter("ddpm")
    x0, noise = calibration()
    for squared in (False, True):
        results = []
        for sum_dtype in ("fp32", "weights"):
            loaded = tiny_loaded()
            accumulate_gradients(
                loaded,
                adapter,
                x0,
                noise,
                0.0,
                timesteps=8,
                chunk=2,
                squared=squared,
                stride=2,
                grad_sum_dtype=sum_dtype,
            )
            results.append([p.grad.clone() for p in loaded.model.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
        half = bf16_loaded()
        accumulate_gradients(
            half,
            adapter,
            x0.bfloat16(),
            noise.bfloat16(),
            0.0,
            timesteps=8,
            chunk=2,
            squared=squared,
            stride=2,
            precision="bf16",
        )
        grads = [p.grad for p in half.model.parameters()]
        assert all(g.dtype == torch.bfloat16 for g in grads)
        wide = torch.cat([g.flatten() for g in results[0]])
        narrow = torch.cat([g.float().flatten() for g in grads])
        assert torch.nn.functional.cosine_similarity(wide, narrow, dim=0) > 0.99


@pytest.mark.parametrize("command", ["score", "prune"])
def test_grad_sum_dtype_option_and_bad_value(dp, tiny_unet_folder, image_folder, tmp_path, command):
    """The option is recorded with the scores (dp score --json, the scores in dp prune's dpcli.json); a bad
    value is one line and exit 2 from the CLI, a BadSetting from the API, before anything is written."""
    result = dp(command, "--help")
    assert "--grad-sum-dtype" in result.stdout
    scan = ["--data", str(image_folder), "--calib-size", "2", "--timesteps", "2"]
    good = [command, str(tiny_unet_folder), *scan, "--grad-sum-dtype", "weights", "--json"]
    if command == "prune":
        good += ["--criterion", "diff-taylor", "--ratio", "0.3", "-o", str(tmp_path / "good")]
    result = dp(*good)
    assert result.exit_code == 0, result.stderr
    if command == "score":
        assert result.json["grad_sum_dtype"] == "weights"
    else:
        record = json.loads((tmp_path / "good" / "dpcli.json").read_text())
        assert record["pruning"]["scores"]["grad_sum_dtype"] == "weights"
    args = [command, str(tiny_unet_folder), "--data", str(image_folder), "--grad-sum-dtype", "fp64"]
    if command == "prune":
        args += ["--criterion", "diff-taylor", "--ratio", "0.3", "-o", str(tmp_path / "out")]
    result = dp(*args)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "Error: --grad-sum-dtype must be one of fp32, weights, got 'fp64'"
    ]
    assert not (tmp_path / "out").exists()
    with pytest.raises(dpcli.errors.BadSetting, match="grad_sum_dtype"):
        getattr(dpcli, command)(
            str(tiny_unet_folder),
            data=str(image_folder),
            grad_sum_dtype="fp64",
            **({"criterion": "diff-taylor", "ratio": 0.3} if command == "prune" else {}),
        )


@pytest.mark.slow
def test_two_gloo_processes_sum_bf16_gradients_like_one(tmp_path):
    """torchrun: each process sums its share's bf16 gradients in float32, the float32 sums are added over
    the processes: the scores of one process, to bf16's rounding of each timestep's gradient (the two
    processes' bf16 forwards see other batch shapes)."""
    from safetensors.torch import load_file

    scan = ["--calib-size", "5", "--timestep-stride", "2", "--weights-dtype", "bf16", "--precision", "bf16"]
    one = run_dp(["score", *DIGITS_SCAN, *scan, "-o", tmp_path / "one.safetensors"], processes=1)
    two = run_dp(["score", *DIGITS_SCAN, *scan, "-o", tmp_path / "two.safetensors"], processes=2)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["cutoff"] == one["cutoff"] < 29
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-2)
    single, shared = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert single.keys() == shared.keys()
    for key in single:
        correlation = _spearman(single[key].double(), shared[key].double())
        assert correlation > 0.98, (key, correlation)
