"""Options shared by several commands, defined once (names are a contract: see DESIGN.md)."""

from pathlib import Path
from typing import Annotated

import typer

Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
Adapter = Annotated[
    str | None,
    typer.Option("--adapter", help="Model adapter to use instead of detecting one (see dp plugins)."),
]
Config = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="Model config for single weight files: config.json (or a folder), or the training YAML of a "
        "CompVis / Stable Diffusion checkpoint.",
        show_default=False,
    ),
]
Scheduler = Annotated[
    Path | None,
    typer.Option(
        "--scheduler", help="scheduler_config.json (or a folder with one) replacing the model's scheduler."
    ),
]
Output = Annotated[Path | None, typer.Option("--output", "-o", help="Where to write the result.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed: data order, noise and timesteps.")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Never prompt; fail if something is missing.")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite a non-empty output folder.")]
MaxParams = Annotated[
    int | None,
    typer.Option(
        "--max-params",
        min=1,
        help="Refuse a model with more parameters than this before allocating it (for configs from "
        "outside; env DPCLI_MAX_PARAMS). Models too large for the memory available are always refused.",
    ),
]
WeightsDtype = Annotated[
    str | None,
    typer.Option(
        "--weights-dtype",
        help="Build and load the weights in fp32 (default), bf16 or fp16, never through a float32 copy "
        "(SDXL's UNet: 5.1 GB in bf16, 10.3 GB in fp32). Scan with the matching --precision.",
    ),
]
Data = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Images: a folder (recursive; png/jpg/jpeg/webp/bmp), a Hugging Face dataset (save_to_disk "
        "folder, .parquet/.arrow files, hf:NAME from the local cache), tar shards (shards/{000..009}.tar) "
        "or builtin:digits.",
    ),
]
Split = Annotated[
    str | None,
    typer.Option("--split", help="Split of a Hugging Face dataset (default: train, or its only split)."),
]
ImageColumn = Annotated[
    str | None,
    typer.Option("--image-column", help="Image column of a Hugging Face dataset (default: guessed)."),
]
CaptionColumn = Annotated[
    str | None,
    typer.Option("--caption-column", help="Caption column of a Hugging Face dataset (default: guessed)."),
]
LabelColumn = Annotated[
    str | None,
    typer.Option("--label-column", help="Class-label column of a Hugging Face dataset (default: guessed)."),
]
OnBadSample = Annotated[
    str | None,
    typer.Option(
        "--on-bad-sample",
        help="An image that cannot be decoded: skip (replaced by the next good one, warned about and listed "
        "in the report; the default) or fail (exit 2 naming it).",
        show_default=False,
    ),
]
MaxBadFraction = Annotated[
    float | None,
    typer.Option(
        "--max-bad-fraction",
        min=0.0,
        max=1.0,
        help="Exit 2 once more than this fraction of the data is unreadable (default 0.01; a fine-tune "
        "writes a checkpoint first).",
        show_default=False,
    ),
]
Workers = Annotated[
    int | None,
    typer.Option(
        "--workers",
        min=0,
        help="Processes decoding images (0: in the main process; default: half the cores).",
    ),
]
ModelArgument = Annotated[
    str,
    typer.Argument(help="Model folder, pipeline folder, weights file, Hub id, config:NAME or builtin:NAME."),
]
Criterion = Annotated[str | None, typer.Option("--criterion", help="Importance criterion (see dp plugins).")]
Threshold = Annotated[
    float | None,
    typer.Option(
        "--threshold", help="diff-taylor: stop the timestep scan when loss < threshold × max loss [0..1]."
    ),
]
Ratio = Annotated[
    float | None, typer.Option("--ratio", help="Fraction of channels removed per layer [0, 1).")
]
TargetMacs = Annotated[
    float | None,
    typer.Option("--target-macs", help="Keep this fraction of the MACs (searched), e.g. 0.5."),
]
TargetParams = Annotated[
    float | None, typer.Option("--target-params", help="Keep this fraction of the parameters (searched).")
]
CalibSize = Annotated[
    int | None,
    typer.Option(
        "--calib-size",
        min=1,
        help="Calibration images used at every timestep (default 32).",
        show_default=False,
    ),
]
TimestepStride = Annotated[
    int | None,
    typer.Option(
        "--timestep-stride",
        min=1,
        help="Scan only t = 0, K, 2K, ... (gradients scaled by K); 1 = every timestep (default, the reference).",
        show_default=False,
    ),
]
ScanBudget = Annotated[
    int | None,
    typer.Option(
        "--scan-budget",
        min=1,
        help="Forward samples the scan may spend: dp picks --timestep-stride and --calib-size (and says which).",
    ),
]
Chunk = Annotated[
    int | None,
    typer.Option(
        "--chunk",
        min=1,
        help="Timesteps packed into one forward pass (default: 64 samples per pass on a CPU, 256 on a GPU, "
        "/ calib-size per process).",
    ),
]
Timesteps = Annotated[
    int | None, typer.Option("--timesteps", min=1, help="Scan at most this many timesteps (default: all).")
]
Ignore = Annotated[
    list[str] | None,
    typer.Option(
        "--ignore", help="Module name or pattern to leave unpruned (repeatable), e.g. 'mid_block.*'."
    ),
]
RoundTo = Annotated[
    int | None, typer.Option("--round-to", min=1, help="Round kept channels to a multiple of N.")
]
Layout = Annotated[
    str,
    typer.Option(
        "--layout",
        help="free: per-layer widths (dp loads it); diffusers: one width per UNet level, a real diffusers "
        "config that plain from_pretrained loads.",
    ),
]
HeadRatio = Annotated[
    float,
    typer.Option("--head-ratio", min=0.0, max=0.95, help="Also remove this fraction of attention heads."),
]
Plot = Annotated[Path | None, typer.Option("--plot", help="Write the per-timestep loss curve as a PNG.")]
Prompt = Annotated[
    str | None,
    typer.Option(
        "--prompt",
        help="Text-conditional models: calibrate with this prompt (default: captions beside the images, "
        "else the empty prompt).",
    ),
]
NumSamples = Annotated[int, typer.Option("--num-samples", min=1, help="Images to sample (indices 0..N-1).")]
SamplingSteps = Annotated[
    int | None, typer.Option("--steps", min=1, help="Denoising steps of the sampler (default 100).")
]
Spacing = Annotated[
    str | None,
    typer.Option(
        "--spacing",
        help="Timesteps: uniform (as diffusers spaces them) or quad (the paper's CIFAR-10 spacing).",
    ),
]
SamplerName = Annotated[
    str | None, typer.Option("--sampler", help="ddim (eta 0, deterministic; default) or ddpm.")
]
Device = Annotated[
    str | None,
    typer.Option(
        "--device", help="cpu, cuda, cuda:1, ... (default: this rank's GPU if there is one, else CPU)."
    ),
]
Precision = Annotated[
    str,
    typer.Option("--precision", help="auto (bf16, else fp16, on GPU; fp32 on CPU), fp32, bf16 or fp16."),
]
LatencyBatch = Annotated[
    int,
    typer.Option("--latency-batch", min=1, help="Throughput batch for latency (batch 1 is always timed)."),
]
Repeats = Annotated[
    int, typer.Option("--repeats", min=1, help="Timed repeats per latency figure (the median is reported).")
]
Latency = Annotated[
    bool,
    typer.Option("--latency/--no-latency", help="Measure latency (on by default; --no-latency skips it)."),
]
SamplingPrompts = Annotated[
    list[str] | None,
    typer.Option(
        "--prompt",
        help="Text-conditional models: sample with this prompt (repeatable; sample i gets prompt i mod P; "
        "default the empty prompt).",
    ),
]
PromptsFile = Annotated[
    Path | None,
    typer.Option(
        "--prompts",
        help="Text-conditional models: prompts from a file (one per line; metadata.jsonl or captions.txt as "
        "dp score reads them; a COCO captions .json); sample i gets prompt i mod P.",
    ),
]
NegativePrompt = Annotated[
    str | None,
    typer.Option(
        "--negative-prompt", help="Text models under guidance: the unconditional prompt (default empty)."
    ),
]
GuidanceScale = Annotated[
    float | None,
    typer.Option(
        "--guidance-scale",
        help="Classifier-free guidance scale (default: as the model's diffusers pipeline, 7.5 for Stable "
        "Diffusion, 1 otherwise; 1 turns guidance off).",
    ),
]
ClassLabels = Annotated[
    list[int] | None,
    typer.Option(
        "--class-label",
        help="Class-conditional models: sample this class (repeatable; sample i gets label i mod L; default "
        "every class in turn).",
    ),
]
RunDevice = Annotated[
    str,
    typer.Option(
        "--device",
        help="auto (this process's GPU when there is one, else the CPU), cpu, cuda (under torchrun: GPU "
        "LOCAL_RANK), cuda:N or mps.",
    ),
]
ScanPrecision = Annotated[
    str,
    typer.Option(
        "--precision",
        help="fp32, or bf16/fp16 autocast for the scan's forward (fp16 on GPU only); gradients stay fp32.",
    ),
]
GradientCheckpointing = Annotated[
    bool,
    typer.Option(
        "--gradient-checkpointing",
        help="Recompute each block's activations in the backward instead of keeping them: less memory, "
        "more compute (diffusers UNets).",
    ),
]
GradSumDtype = Annotated[
    str,
    typer.Option(
        "--grad-sum-dtype",
        help="fp32 (default): sum the scan's gradients of bf16/fp16 weights (--weights-dtype) in float32, "
        "4 bytes per weight; weights: sum them in the weights' dtype, 2 bytes per weight, at a cost in "
        "agreement with fp32 scores (README). No effect on fp32 weights.",
    ),
]
Optimizer = Annotated[
    str,
    typer.Option(
        "--optimizer",
        help="adamw (torch), or adamw8bit (bitsandbytes' 8-bit AdamW: 2 instead of 8 bytes of state per "
        "weight; needs the bitsandbytes package and, for its 8-bit kernels, a CUDA GPU).",
    ),
]


# Option groups: options that several commands take with the same default, declared once. A command
# function takes a group's options as ``**options`` (see ``with_options``); each entry is
# name -> (the option's type above, its default).
LOAD_OPTIONS = {
    "adapter": (Adapter, None),
    "config": (Config, None),
    "scheduler": (Scheduler, None),
    "max_params": (MaxParams, None),
}
# dp score and dp prune: the dtype the weights are built and loaded in (a load option of theirs).
WEIGHTS_OPTIONS = {"weights_dtype": (WeightsDtype, None)}
DATA_OPTIONS = {
    "data": (Data, None),
    "split": (Split, None),
    "image_column": (ImageColumn, None),
    "caption_column": (CaptionColumn, None),
    "label_column": (LabelColumn, None),
    "on_bad_sample": (OnBadSample, None),
    "max_bad_fraction": (MaxBadFraction, None),
}
# dp score and dp prune: the timestep scan, and the pruning options the scores are computed for.
SCAN_OPTIONS = {
    "workers": (Workers, None),
    "threshold": (Threshold, None),
    "calib_size": (CalibSize, None),
    "batch_size": (BatchSize, 256),
    "chunk": (Chunk, None),
    "timesteps": (Timesteps, None),
    "timestep_stride": (TimestepStride, None),
    "scan_budget": (ScanBudget, None),
    "prompt": (Prompt, None),
    "device": (RunDevice, "auto"),
    "precision": (ScanPrecision, "fp32"),
    "gradient_checkpointing": (GradientCheckpointing, False),
    "grad_sum_dtype": (GradSumDtype, "fp32"),
    "seed": (Seed, 0),
    "ignore": (Ignore, None),
    "round_to": (RoundTo, None),
    "head_ratio": (HeadRatio, 0.0),
}
# dp eval and dp compare: what the samples are conditioned on, and how they are sampled and timed.
CONDITIONING_OPTIONS = {
    "prompt": (SamplingPrompts, None),
    "prompts": (PromptsFile, None),
    "negative_prompt": (NegativePrompt, None),
    "guidance_scale": (GuidanceScale, None),
    "class_label": (ClassLabels, None),
}
MEASURING_OPTIONS = {
    "batch_size": (BatchSize, 64),
    "latency_batch": (LatencyBatch, 64),
    "repeats": (Repeats, 5),
    "latency": (Latency, True),
    "device": (Device, None),
    "precision": (Precision, "auto"),
    "output": (Output, None),
    "force": (Force, False),
}


def pick(group: dict, *names: str) -> dict:
    """The options ``names`` of ``group`` (a command that takes only some of them)."""
    return {name: group[name] for name in names}


def with_options(*groups: dict):
    """Give a command function, which takes them as ``**options``, the options of ``groups``: Typer (and
    the parity test, tests/test_api.py) read the signature this sets, where they come after the function's
    own parameters, before ``--json``."""
    import inspect

    keyword = inspect.Parameter.KEYWORD_ONLY

    def decorate(command):
        own = [
            parameter.replace(kind=keyword)
            for parameter in inspect.signature(command).parameters.values()
            if parameter.kind is not parameter.VAR_KEYWORD
        ]
        shared = [
            inspect.Parameter(name, keyword, annotation=annotation, default=default)
            for group in groups
            for name, (annotation, default) in group.items()
        ]
        last = [parameter for parameter in own if parameter.name == "json_output"]
        first = [parameter for parameter in own if parameter.name != "json_output"]
        command.__signature__ = inspect.Signature([*first, *shared, *last])
        return command

    return decorate
