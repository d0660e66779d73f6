"""The export job: the denoiser (UNet) of a model as ONNX (or TorchScript), checked against PyTorch.

What is exported is what dp samples with: the adapter's ``predict(sample, timestep, conditioning)``, so
pixel UNets, latent UNets and text UNets export the same way. Inputs: ``sample`` [batch, C, H, W] float32,
``timestep`` [batch] int64, then the model's conditioning (``encoder_hidden_states`` [batch, tokens,
width] for text and class-context models, ``class_labels`` [batch] int64 for class-conditional UNets);
output ``prediction`` shaped like ``sample``. The batch dimension is dynamic.

ONNX uses torch's TorchScript-based exporter (``dynamo=False``): it needs neither onnxscript nor
``torch.export``-clean model code, and handles diffusers' UNets as they are. The file is verified with
onnxruntime on the CPU at another batch size than the traced one (so the dynamic batch is checked too),
and only a file within ``tolerance`` (max abs difference) takes the output's name. A model over 2 GB
(Stable Diffusion in fp32) is written as ``OUT`` plus its weights in ``OUT.data`` (ONNX external data).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from dpcli.adapters.base import LoadedModel
from dpcli.errors import BadInput, BadSetting, DpError
from dpcli.io.files import write_failure
from dpcli.reporting import Reporter, silent

FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 17
MIN_OPSET = 14  # scaled_dot_product_attention (diffusers' attention) needs opset 14
TRACE_BATCH, VERIFY_BATCH = 2, 3


@dataclass
class ExportSettings:
    """How to export: ``format`` (onnx or torchscript), the ONNX ``opset``, and the largest max abs
    difference to PyTorch that verification accepts (``tolerance``)."""

    format: str = "onnx"
    opset: int = DEFAULT_OPSET
    tolerance: float = 1e-3

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise BadSetting("format", "{format} must be one of " + ", ".join(FORMATS), got=repr(self.format))
        highest = max_opset()
        if not MIN_OPSET <= self.opset <= highest:
            raise BadSetting("opset", f"{{opset}} must be in [{MIN_OPSET}, {highest}]", got=self.opset)
        if not self.tolerance > 0:
            raise BadSetting("tolerance", "{tolerance} must be positive", got=self.tolerance)


def max_opset() -> int:
    """The highest opset torch's TorchScript-based ONNX exporter writes."""
    from torch.onnx import _constants

    return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET))


class Denoiser(torch.nn.Module):
    """``loaded``'s prediction as a module with positional tensor inputs (what exporters trace)."""

    def __init__(self, loaded: LoadedModel, conditioning_names: list[str]):
        super().__init__()
        self.model = loaded.model
        self.loaded = loaded
        self.adapter = loaded.adapter
        self.conditioning_names = list(conditioning_names)

    def forward(self, sample, timestep, *conditioning):
        given = dict(zip(self.conditioning_names, conditioning, strict=True)) or None
        return self.adapter.predict(self.loaded, sample, timestep, given)


def example_inputs(loaded: LoadedModel, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Named inputs of one forward at ``batch_size``: the adapter's example inputs, with random timesteps."""
    inputs = loaded.adapter.example_inputs(loaded, batch_size=batch_size)
    sample, conditioning = inputs[0], (inputs[2] if len(inputs) > 2 else None) or {}
    total = int(loaded.scheduler.config.num_train_timesteps) if loaded.scheduler is not None else 1000
    generator = torch.Generator().manual_seed(seed)
    named = {
        "sample": torch.randn(sample.shape, generator=generator).to(sample.dtype),
        "timestep": torch.randint(0, total, (batch_size,), generator=generator, dtype=torch.long),
    }
    for name, value in conditioning.items():
        if not isinstance(value, torch.Tensor):
            raise BadInput(
                f"the {loaded.adapter_name} adapter's conditioning {name!r} is not a tensor: cannot export"
            )
        named[name] = value.detach().cpu()
    return named


@dataclass
class ExportReport:
    """What ``run`` did; ``to_json()`` is what ``dp export --json`` prints."""

    model: str
    format: str
    output: str
    files: list[str]
    opset: int | None
    inputs: list[dict]
    outputs: list[dict]
    verified_batch: int
    max_abs_diff: float
    tolerance: float
    bytes: int
    seconds: float

    def to_json(self) -> dict:
        return dict(vars(self))


def _describe(named: dict[str, torch.Tensor]) -> list[dict]:
    return [
        {"name": name, "shape": ["batch", *value.shape[1:]], "dtype": str(value.dtype).replace("torch.", "")}
        for name, value in named.items()
    ]


def run(
    loaded: LoadedModel,
    settings: ExportSettings,
    *,
    output: Path,
    force: bool = False,
    reporter: Reporter | None = None,
) -> ExportReport:
    """The export job: export ``loaded``'s denoiser to ``output`` (locked) and verify it; nothing is
    written unless it verifies.

    Raises BadSetting for bad settings or an existing output without ``force``, DpError (exit 1) when the
    exported model differs from PyTorch by more than ``settings.tolerance``.
    """
    from dpcli.io.files import output_lock

    reporter = silent(reporter)
    settings.validate()
    output = Path(output)
    with output_lock(output, on_note=reporter.warn):
        if output.is_dir():
            raise BadInput(f"output {output} is a folder; give a file name such as model.{settings.format}")
        if output.exists() and not force:
            raise BadSetting("force", "output {output} exists (use {force} to replace it)", output=output)
        reporter.status(f"Exporting to {settings.format} and verifying")
        started = time.perf_counter()
        parameter = next(loaded.model.parameters())
        device, dtype = parameter.device, parameter.dtype
        try:
            return _export(loaded, output, settings, force, started)
        finally:  # exported on the CPU in fp32; the caller's model is left as it was
            _move(loaded.model, device, dtype)


def _move(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` on ``device`` in ``dtype``, touching only what differs (diffusers warns on any dtype cast)."""
    parameter = next(model.parameters())
    if parameter.device != device:
        model.to(device)
    if parameter.dtype != dtype:
        model.to(dtype=dtype)
    return model


def _export(loaded: LoadedModel, output: Path, settings: ExportSettings, force: bool, started: float):
    model = _move(loaded.model, torch.device("cpu"), torch.float32).eval()
    view = dataclasses.replace(loaded, model=model)
    traced_inputs = example_inputs(view, TRACE_BATCH, seed=0)
    check_inputs = example_inputs(view, VERIFY_BATCH, seed=1)
    names = [name for name in traced_inputs if name not in ("sample", "timestep")]
    wrapper = Denoiser(view, names).eval()
    with torch.no_grad():
        expected = wrapper(*check_inputs.values()).float()
    output_shape = ["batch", *expected.shape[1:]]
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".export", dir=output.parent))
    except OSError as exc:
        raise write_failure(exc, output) from exc
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if settings.format == "onnx":
                temporary = workdir / output.name
                _export_onnx(wrapper, traced_inputs, temporary, settings.opset)
                temporary = consolidate_external_data(temporary, workdir / "final" / output.name)
                produced = _run_onnx(temporary, check_inputs)
            else:
                temporary = workdir / output.name
                traced = torch.jit.trace(wrapper, tuple(traced_inputs.values()), check_trace=False)
                traced.save(str(temporary))
                produced = torch.jit.load(str(temporary))(*check_inputs.values()).float()
        difference = float((produced - expected).abs().max())
        if not difference <= settings.tolerance:  # NaN fails too
            raise DpError(
                f"the exported model differs from PyTorch by up to {difference:.3g} (max abs difference at "
                f"batch {VERIFY_BATCH}), above the tolerance {settings.tolerance:g}: not written"
            )
        files = _move_into_place(temporary, output, force)
    except OSError as exc:
        raise write_failure(exc, output) from exc
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return ExportReport(
        model=loaded.source,
        format=settings.format,
        output=str(output),
        files=[str(f) for f in files],
        opset=settings.opset if settings.format == "onnx" else None,
        inputs=_describe(traced_inputs),
        outputs=[{"name": "prediction", "shape": output_shape, "dtype": "float32"}],
        verified_batch=VERIFY_BATCH,
        max_abs_diff=difference,
        tolerance=settings.tolerance,
        bytes=sum(f.stat().st_size for f in files),
        seconds=time.perf_counter() - started,
    )


def _export_onnx(wrapper: torch.nn.Module, inputs: dict[str, torch.Tensor], path: Path, opset: int) -> None:
    dynamic = {name: {0: "batch"} for name in [*inputs, "prediction"]}
    torch.onnx.export(
        wrapper,
        tuple(inputs.values()),
        str(path),
        dynamo=False,
        input_names=list(inputs),
        output_names=["prediction"],
        dynamic_axes=dynamic,
        opset_version=opset,
        do_constant_folding=True,
    )


def consolidate_external_data(path: Path, target: Path) -> Path:
    """``path`` when the exporter wrote one self-contained file; otherwise (a model over 2 GB, whose
    tensors the exporter writes as one file each beside it) the model re-saved as ``target`` with all its
    tensors in ``target.data``. Returns the model file to use."""
    import onnx

    if [p for p in path.parent.iterdir() if p.is_file()] == [path]:
        return path
    target.parent.mkdir(parents=True, exist_ok=True)
    proto = onnx.load(str(path), load_external_data=True)
    onnx.save_model(
        proto,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{target.name}.data",
        size_threshold=1024,
    )
    return target


def _run_onnx(path: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The ONNX model's output for ``inputs`` under onnxruntime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {item.name: inputs[item.name].numpy() for item in session.get_inputs()}
    return torch.from_numpy(session.run(None, feeds)[0]).float()


def _move_into_place(temporary: Path, output: Path, force: bool) -> list[Path]:
    """Move the verified file (and its ``.data`` file, if any) to ``output``; the data file first, so
    ``output`` never names weights that are not there yet."""
    files = []
    data = temporary.with_name(f"{temporary.name}.data")
    if data.exists():
        target_data = output.with_name(f"{output.name}.data")
        if target_data.exists() and not force:
            raise BadSetting(
                "force", "output {output} exists (use {force} to replace it)", output=target_data
            )
        os.replace(data, target_data)
        files.append(target_data)
    os.replace(temporary, output)
    return [output, *files]
