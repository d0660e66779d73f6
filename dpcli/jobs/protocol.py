"""The evaluation protocol: everything that makes an eval number reproducible, recorded in every report,
and the check that refuses to put numbers made under different protocols side by side.

A protocol is a flat JSON object. Every key except ``VERSION_KEYS`` and ``DESCRIPTIVE_KEYS`` must be equal
for two FIDs (or CLIP scores) to be comparable: paths are descriptive (the same data may live elsewhere),
their content hashes are compared, and prompts are compared by the digest of the list. Versions are
recorded and a difference is only flagged (float drift between library versions is far below what sample
count or guidance change).
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import torch

from dpcli import __version__
from dpcli.conditions import Conditions, sha256_of_file
from dpcli.sampling import SamplerSettings

VERSION_KEYS = ("dpcli_version", "torch_version", "diffusers_version", "torchmetrics_version")
DESCRIPTIVE_KEYS = ("reference_data", "reference_stats", "clip_model", "clip_model_path")
INCEPTION_INPUT = 299  # torch-fidelity's Inception-v3 resizes (bilinear) every image to 299x299


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def data_fingerprint(data) -> str:
    """A digest of reference data (``dpcli.data.Source.fingerprint``: for a folder the sorted image files
    with their sizes, for a dataset its own fingerprint and split, for shards their names and sizes)."""
    from dpcli.data import Source, open_source

    return (data if isinstance(data, Source) else open_source(data)).fingerprint()


def build_protocol(
    sampling: SamplerSettings,
    num_samples: int,
    conditions: Conditions,
    image_shape: list[int],
    fid_plan=None,
    clip_folder: Path | None = None,
    clip_model: str | None = None,
) -> dict:
    """The protocol of one ``dp eval`` run (``fid_plan``: a dpcli.jobs.evaluate.FidPlan, or None)."""
    from dpcli.metrics import DIGITS, DIGITS_WEIGHTS, DigitsFeatureNet

    protocol = {
        "num_samples": num_samples,
        "sampler": sampling.sampler,
        "spacing": sampling.spacing,
        "steps": sampling.steps,
        "seed": sampling.seed,
        **conditions.record(),
        "image_size": list(image_shape[-2:]),
        "fid_implementation": None,
        "feature_network": None,
        "feature_weights_sha256": None,
        "feature_input_size": None,
        "reference_data": None,
        "reference_stats": None,
        "reference_sha256": None,
        "clip_implementation": None,
        "clip_model": None,
        "clip_model_path": None,
        "clip_weights_sha256": None,
    }
    if fid_plan is not None:
        weights = DIGITS_WEIGHTS if fid_plan.extractor == DIGITS else fid_plan.inception_weights
        size = DigitsFeatureNet.size if fid_plan.extractor == DIGITS else INCEPTION_INPUT
        protocol.update(
            fid_implementation="torchmetrics FrechetInceptionDistance",
            feature_network=fid_plan.extractor,
            feature_weights_sha256=sha256_of_file(weights),
            feature_input_size=[size, size],
            reference_data=str(fid_plan.data) if fid_plan.data is not None else None,
            reference_stats=str(fid_plan.stats.source) if fid_plan.stats is not None else None,
            reference_sha256=(
                sha256_of_file(Path(fid_plan.stats.source))
                if fid_plan.stats is not None
                else data_fingerprint(fid_plan.source if fid_plan.source is not None else fid_plan.data)
            ),
        )
    if clip_folder is not None:
        protocol.update(
            clip_implementation="torchmetrics CLIPScore",
            clip_model=clip_model or str(clip_folder),
            clip_model_path=str(clip_folder),
            clip_weights_sha256=_clip_weights_sha256(clip_folder),
        )
    protocol.update(
        dpcli_version=__version__,
        torch_version=torch.__version__,
        diffusers_version=_version("diffusers"),
        torchmetrics_version=_version("torchmetrics"),
    )
    return protocol


def _clip_weights_sha256(folder: Path) -> str | None:
    weights = Path(folder) / "model.safetensors"
    return sha256_of_file(weights) if weights.is_file() else None


def _compared(key: str, protocol: dict):
    value = protocol.get(key)
    if key == "prompts" and isinstance(value, dict):
        return value.get("sha256")
    return value


def protocol_differences(first: dict, other: dict) -> tuple[list[str], list[str]]:
    """Keys whose values differ: those that make results incomparable, then the version keys."""
    skipped = (*VERSION_KEYS, *DESCRIPTIVE_KEYS)
    keys = [k for k in dict.fromkeys([*first, *other]) if k not in skipped]
    different = [k for k in keys if _compared(k, first) != _compared(k, other)]
    versions = [k for k in VERSION_KEYS if first.get(k) != other.get(k)]
    return different, versions


def describe_difference(key: str, first: dict, other: dict) -> str:
    """``key first-value vs other-value``, long values shortened."""

    def short(value) -> str:
        text = str(value.get("file") or value.get("sha256")) if isinstance(value, dict) else str(value)
        return text if len(text) <= 40 else text[:37] + "..."

    return f"{key} {short(first.get(key))} vs {short(other.get(key))}"
