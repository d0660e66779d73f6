"""Image quality metrics from torchmetrics: FID (Inception-v3 of torch-fidelity, or the shipped digits
feature network for ``builtin:digits``), and SSIM / PSNR between images paired by sample index.

Images here are uint8 tensors ``[N, C, H, W]`` (what a PNG stores); SSIM and PSNR see them in [0, 1].

Inception weights are never downloaded: they come from ``--inception-weights FILE`` or the cache
torch-fidelity itself downloads to (``$TORCH_HOME/hub/checkpoints/``, see :func:`default_inception_path`).
They are read with ``torch.load(weights_only=True)`` (or safetensors) and handed to torch-fidelity as a
file of plain tensors written by us, because torch-fidelity would unpickle the given file unrestricted.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dpcli.errors import BadInput, BadSetting
from dpcli.io.files import atomic_write

INCEPTION = "inception-v3"
DIGITS = "dpcli-digits"
INCEPTION_FEATURES = 2048
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
DIGITS_WEIGHTS = Path(__file__).resolve().parent / "resources" / "digits_features.safetensors"
STATS_FORMAT = "dpcli-fid-stats"
PSNR_IDENTICAL = 100.0  # dB reported for identical images (PSNR is infinite there)
_BATCH = 64


# The digits feature network ---------------------------------------------------------------------


class DigitsFeatureNet(nn.Module):
    """A small CNN trained to classify ``builtin:digits`` (scripts/train_digits_features.py); its
    64-wide pooled features stand in for Inception's on 16x16 digits. Takes float images in [0, 1] of
    any size and channel count (averaged to gray, resized to 16x16)."""

    num_features = 64
    size = 16

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(self.num_features, 10)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        gray = images.float().mean(dim=1, keepdim=True)
        if gray.shape[-2:] != (self.size, self.size):
            gray = nn.functional.interpolate(
                gray, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
            )
        return gray * 2 - 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(self.prepare(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward(images))


def load_digits_feature_net() -> DigitsFeatureNet:
    from safetensors.torch import load_file

    net = DigitsFeatureNet()
    net.load_state_dict(load_file(str(DIGITS_WEIGHTS)), strict=True)
    return net.eval().requires_grad_(False)


# Inception weights ------------------------------------------------------------------------------


def default_inception_path() -> Path:
    """Where torch-fidelity (and torchmetrics) cache their Inception-v3 weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def find_inception_weights(explicit: Path | None) -> Path | None:
    """The Inception weights file to use: ``explicit`` (which must exist) or the cached one, else None."""
    if explicit is not None:
        explicit = Path(explicit).expanduser()
        if not explicit.is_file():
            raise BadSetting("inception_weights", "{inception_weights} {path}: file not found", path=explicit)
        return explicit
    cached = default_inception_path()
    return cached if cached.is_file() else None


def missing_inception_message() -> str:
    return (
        f"FID needs Inception-v3 weights, which are not downloaded by dp: none at {default_inception_path()}; "
        f"pass --inception-weights FILE (torch-fidelity's {INCEPTION_FILE})"
    )


def _inception_metric(weights: Path):
    """torchmetrics' FID on torch-fidelity's Inception-v3, loaded from ``weights`` without unpickling it."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from dpcli.io.weights import load_tensor_file

    state_dict = load_tensor_file(weights)
    with tempfile.TemporaryDirectory(prefix="dpcli-inception-") as folder:
        plain = Path(folder) / INCEPTION_FILE
        torch.save(state_dict, plain)
        try:
            # sync_on_compute=False: under torchrun only rank 0 computes metrics.
            return FrechetInceptionDistance(
                feature=INCEPTION_FEATURES, feature_extractor_weights_path=str(plain), sync_on_compute=False
            )
        except RuntimeError as exc:
            raise BadInput(
                f"{weights} does not hold torch-fidelity's Inception-v3 weights ({str(exc).splitlines()[0]})"
            ) from None


# FID ------------------------------------------------------------------------------------------


@dataclass
class FidStats:
    """Gaussian statistics of a set's features: what FID compares."""

    mu: torch.Tensor  # [F] float64
    sigma: torch.Tensor  # [F, F] float64
    count: int
    extractor: str
    source: str = ""

    @property
    def features(self) -> int:
        return int(self.mu.shape[0])


def extractor_features(extractor: str) -> int:
    return INCEPTION_FEATURES if extractor == INCEPTION else DigitsFeatureNet.num_features


class FidComputer:
    """torchmetrics' FrechetInceptionDistance with the chosen feature extractor, fed uint8 images."""

    def __init__(
        self, extractor: str, inception_weights: Path | None = None, device: str | torch.device = "cpu"
    ):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.extractor = extractor
        if extractor == INCEPTION:
            if inception_weights is None:
                raise BadInput(missing_inception_message())
            metric = _inception_metric(inception_weights)
        elif extractor == DIGITS:
            metric = FrechetInceptionDistance(
                feature=load_digits_feature_net(), normalize=True, sync_on_compute=False
            )
        else:
            raise BadInput(f"unknown FID feature extractor {extractor!r}")
        self.metric = metric.to(device)
        self.device = torch.device(device)

    @property
    def features(self) -> int:
        return extractor_features(self.extractor)

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device)
        if self.extractor == INCEPTION:
            return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[:, :3]
        return images.float() / 255

    def update(self, images: torch.Tensor, real: bool, on_batch: Callable[[int], None] | None = None) -> None:
        """Add uint8 images to the real (reference) or fake (generated) side."""
        if images.dtype != torch.uint8:
            raise TypeError("FidComputer.update expects uint8 images")
        with torch.inference_mode():
            for start in range(0, len(images), _BATCH):
                batch = images[start : start + _BATCH]
                self.metric.update(self._inputs(batch), real=real)
                if on_batch is not None:
                    on_batch(len(batch))

    def real_stats(self, source: str = "") -> FidStats:
        metric = self.metric
        count = int(metric.real_features_num_samples)
        if count < 2:
            raise BadInput(f"FID statistics need at least 2 reference images, got {count}")
        mu = (metric.real_features_sum / count).double().cpu()
        covariance = metric.real_features_cov_sum.double().cpu() - count * torch.outer(mu, mu)
        return FidStats(mu, covariance / (count - 1), count, self.extractor, source)

    def set_real_stats(self, stats: FidStats) -> None:
        if stats.features != self.features:
            raise BadInput(
                f"FID statistics{_from(stats)} have {stats.features} features; the {self.extractor} "
                f"extractor gives {self.features}"
            )
        if stats.extractor != self.extractor:
            raise BadInput(
                f"FID statistics{_from(stats)} were made with {stats.extractor}, not {self.extractor}"
            )
        metric, count = self.metric, max(stats.count, 2)
        device = metric.real_features_sum.device
        mu, sigma = stats.mu.double().to(device), stats.sigma.double().to(device)
        metric.real_features_sum = mu * count
        metric.real_features_cov_sum = sigma * (count - 1) + count * torch.outer(mu, mu)
        metric.real_features_num_samples = torch.tensor(count, device=device)

    def compute(self) -> float:
        if int(self.metric.fake_features_num_samples) < 2:
            raise BadInput("FID needs at least 2 generated images (--num-samples >= 2)")
        return max(0.0, float(self.metric.compute()))


def _from(stats: FidStats) -> str:
    return f" from {stats.source}" if stats.source else ""


def save_stats(stats: FidStats, path: Path, data: str = "") -> None:
    """FID statistics as safetensors: ``mu``, ``sigma``; metadata: extractor, feature size, count."""
    from safetensors.torch import save_file

    metadata = {
        "format": STATS_FORMAT,
        "extractor": stats.extractor,
        "features": str(stats.features),
        "count": str(stats.count),
        "data": data,
    }
    with atomic_write(path) as temporary:
        save_file(
            {"mu": stats.mu.contiguous(), "sigma": stats.sigma.contiguous()},
            str(temporary),
            metadata=metadata,
        )


def load_stats(path: Path) -> FidStats:
    """FID statistics from ``dp eval --save-stats`` (.safetensors) or a pytorch-fid style ``.npz``
    (``mu``, ``sigma``; Inception-v3 pool features)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BadSetting("fid_stats", "{fid_stats} {path}: file not found", path=path)
    if path.suffix.lower() == ".npz":
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as archive:
                mu, sigma = torch.from_numpy(archive["mu"]), torch.from_numpy(archive["sigma"])
        except (OSError, ValueError, KeyError) as exc:
            raise BadInput(f"{path} is not an FID statistics file with mu and sigma ({exc})") from None
        metadata = {"extractor": INCEPTION, "count": "0"}
    else:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
                names = set(handle.keys())
                if metadata.get("format") != STATS_FORMAT or not {"mu", "sigma"} <= names:
                    raise BadInput(f"{path} is not an FID statistics file written by dp eval --save-stats")
                mu, sigma = handle.get_tensor("mu"), handle.get_tensor("sigma")
        except (SafetensorError, OSError) as exc:
            raise BadInput(f"{path} is not a valid safetensors file ({str(exc).splitlines()[0]})") from None
    if mu.ndim != 1 or tuple(sigma.shape) != (mu.shape[0], mu.shape[0]):
        raise BadInput(f"{path}: mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} do not match")
    if "features" in metadata and int(metadata["features"]) != mu.shape[0]:
        raise BadInput(f"{path}: metadata says {metadata['features']} features, mu has {mu.shape[0]}")
    return FidStats(
        mu.double(), sigma.double(), int(metadata.get("count") or 0), metadata["extractor"], str(path)
    )


def data_as_uint8(images: torch.Tensor) -> torch.Tensor:
    """Data images in [-1, 1] (dpcli.data) as uint8, rounded like a PNG."""
    return ((images + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8)


# SSIM and PSNR --------------------------------------------------------------------------------


def ssim_psnr(images: torch.Tensor, reference: torch.Tensor) -> dict:
    """Mean SSIM and PSNR (dB) of image i against reference image i, in [0, 1]. PSNR of identical
    images is infinite; it counts as ``PSNR_IDENTICAL`` dB. Also returns the per-image values."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if images.shape != reference.shape:
        raise BadInput(f"cannot pair images of shape {tuple(images.shape)} with {tuple(reference.shape)}")
    side = min(images.shape[-2:])
    kernel = min(11, side if side % 2 else side - 1)
    ssim_values, psnr_values = [], []
    for start in range(0, len(images), _BATCH):
        preds = images[start : start + _BATCH].double() / 255
        target = reference[start : start + _BATCH].double() / 255
        ssim_values.append(
            structural_similarity_index_measure(
                preds, target, data_range=1.0, kernel_size=kernel, reduction="none"
            ).reshape(-1)
        )
        psnr = peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
        psnr_values.append(
            torch.nan_to_num(psnr, posinf=PSNR_IDENTICAL).clamp(max=PSNR_IDENTICAL).reshape(-1)
        )
    ssim = torch.cat(ssim_values)
    psnr = torch.cat(psnr_values)
    return {
        "ssim": float(ssim.mean()),
        "psnr": float(psnr.mean()),
        "ssim_per_image": ssim.tolist(),
        "psnr_per_image": psnr.tolist(),
    }


# CLIP score -----------------------------------------------------------------------------------

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"  # torchmetrics' default CLIPScore model


def find_clip_model(spec: str | None) -> Path | None:
    """The folder of a CLIP model: ``spec`` as a local folder, or a Hub id in the local Hugging Face cache.
    Never downloads. ``spec`` None means the default model, which is simply absent (None) when not cached;
    a ``spec`` given but found nowhere is a BadSetting."""
    if spec is not None:
        folder = Path(spec).expanduser()
        if folder.is_dir():
            return folder
        if folder.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
            raise BadSetting("clip_model", "{clip_model} {path}: not a CLIP model folder", path=spec)
    cached = _cached_snapshot(spec or DEFAULT_CLIP_MODEL)
    if cached is None and spec is not None:
        raise BadSetting(
            "clip_model",
            "{clip_model} {path}: not a folder, and not in the local Hugging Face cache (dp never downloads "
            "models; copy a CLIP model folder with config.json and model.safetensors here)",
            path=spec,
        )
    return cached


def _cached_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, invalid id: all the same here
        return None


class ClipScorer:
    """CLIP score as torchmetrics' ``CLIPScore`` defines it: the mean over images of 100 × the cosine
    similarity of the CLIP embeddings of the image and of its prompt, floored at 0. Computed here with the
    transformers CLIP model directly (torchmetrics 1.9's CLIPScore breaks on transformers 5, whose
    ``get_image_features`` returns an output object); the model is read from a local folder, safetensors
    weights only, nothing downloaded. Prompts longer than the text encoder's positions are truncated."""

    def __init__(self, folder: Path, device: str | torch.device = "cpu"):
        try:
            import transformers
        except ImportError:
            raise BadInput("CLIP score needs the 'transformers' package (pip install transformers)") from None

        transformers.utils.logging.set_verbosity_error()
        try:
            model = transformers.CLIPModel.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True
            )
            processor = transformers.CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise BadInput(
                f"{folder} is not a usable CLIP model folder (config.json, model.safetensors and a processor "
                f"with its tokenizer): {str(exc).splitlines()[0]}"
            ) from None
        self.folder = Path(folder)
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.processor = processor
        self.image_size = _processor_size(processor)
        self.max_tokens = int(model.config.text_config.max_position_embeddings)
        self.total = 0.0
        self.count = 0

    def update(self, images: torch.Tensor, texts: list[str], on_batch: Callable[[int], None] | None = None):
        """Add uint8 images ``[N, C, H, W]`` with the prompt each was sampled from."""
        if len(images) != len(texts):
            raise ValueError("one text per image")
        with torch.inference_mode():
            for start in range(0, len(images), _BATCH):
                batch = images[start : start + _BATCH]
                batch = batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch[:, :3]
                prompts = list(texts[start : start + _BATCH])
                pixels = self.processor(images=list(batch.cpu()), return_tensors="pt")["pixel_values"]
                tokens = self.processor(
                    text=prompts,
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=self.max_tokens,
                )
                image_features = _embedding(
                    self.model.get_image_features(pixel_values=pixels.to(self.device))
                )
                text_features = _embedding(
                    self.model.get_text_features(
                        input_ids=tokens["input_ids"].to(self.device),
                        attention_mask=tokens["attention_mask"].to(self.device),
                    )
                )
                cosine = torch.nn.functional.cosine_similarity(
                    image_features.float(), text_features.float(), dim=-1
                )
                self.total += float(100 * cosine.sum())
                self.count += len(batch)
                if on_batch is not None:
                    on_batch(len(batch))

    def compute(self) -> float:
        if self.count == 0:
            raise BadInput("CLIP score needs at least one image")
        return max(0.0, self.total / self.count)


def _embedding(output) -> torch.Tensor:
    """The projected embedding: transformers < 5 returns it as a tensor, 5 as ``pooler_output``."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _processor_size(processor) -> list[int] | None:
    """The size the CLIP processor crops images to (a dict, or transformers 5's SizeDict)."""
    crop = getattr(processor.image_processor, "crop_size", None)
    height = crop.get("height") if isinstance(crop, dict) else getattr(crop, "height", None)
    width = crop.get("width") if isinstance(crop, dict) else getattr(crop, "width", None)
    return [int(height), int(width)] if height and width else None
