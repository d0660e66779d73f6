"""Prompts, class labels and guidance for sampling conditional models (``dp eval``, ``dp compare``).

Sample ``i`` gets prompt ``i mod P`` of the ``P`` prompts and class label ``i mod L`` of the ``L`` labels,
so the conditioning of an image depends on its index only (not on the batch size or the process), and
every model of a comparison gets the same prompt, label and noise for the same index. Class-conditional
models without ``class_labels`` get every class in turn (label ``i mod num_classes``): an even spread.

Prompt files (``--prompts FILE``): one prompt per line; a ``*.jsonl`` file (Hugging Face ImageFolder
``metadata.jsonl``: one JSON object per line with ``text``, ``caption`` or ``prompt``); ``captions.txt``
(``FILE<TAB>CAPTION`` per line, as ``dp score`` reads it beside images); or a ``*.json`` COCO captions file
(``captions_val2014.json``: the first caption of each image, in annotation order, one prompt per image).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from dpcli.adapters.base import ConditioningSpec
from dpcli.data.folder import caption_entries
from dpcli.errors import BadInput, BadSetting
from dpcli.io.files import read_json

INLINE_RECORD_LIMIT = 64  # prompts up to this many are written into reports in full


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_of_json(value) -> str:
    """A stable digest of a JSON-ready value (sorted keys, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class PromptSet:
    """Prompts in order, and where they came from (``file`` None for prompts given one by one)."""

    prompts: list[str]
    file: Path | None = None
    file_sha256: str | None = None

    def record(self) -> dict:
        """What a report keeps: the file and its hash, the count, a digest of the list, and the prompts
        themselves when they were given inline (or are few)."""
        return {
            "file": str(self.file) if self.file is not None else None,
            "file_sha256": self.file_sha256,
            "count": len(self.prompts),
            "sha256": sha256_of_json(self.prompts),
            "prompts": self.prompts
            if self.file is None or len(self.prompts) <= INLINE_RECORD_LIMIT
            else None,
        }


def read_prompts_file(path: Path) -> PromptSet:
    """The prompts of a prompt file (see the module docstring for the formats); its path is made absolute,
    so reports name it wherever they are read."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise BadSetting("prompts", "{prompts} {path}: file not found", path=path)
    if path.suffix.lower() == ".json":
        prompts = _coco_captions(path, read_json(path))
    else:
        try:
            if path.suffix.lower() == ".jsonl" or path.name == "captions.txt":
                prompts = [text for _, text in caption_entries(path, names=False)]
            else:
                lines = path.read_text(encoding="utf-8").splitlines()
                prompts = [line.strip() for line in lines if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInput(f"{path}: unreadable prompt file ({exc})") from None
    if not prompts:
        raise BadSetting("prompts", "{prompts} {path} holds no prompts", path=path)
    return PromptSet(prompts, path, sha256_of_file(path))


def _coco_captions(path: Path, document) -> list[str]:
    annotations = document.get("annotations") if isinstance(document, dict) else None
    if not isinstance(annotations, list):
        raise BadInput(
            f'{path}: expected a COCO captions file ({{"annotations": [{{"image_id", "caption"}}]}})'
        )
    first: dict = {}
    for number, entry in enumerate(annotations):
        if not isinstance(entry, dict) or not isinstance(entry.get("caption"), str):
            raise BadInput(f"{path}: annotation {number} has no caption")
        first.setdefault(entry.get("image_id", number), entry["caption"].strip())
    return list(first.values())


@dataclass
class ConditioningRequest:
    """What the user asked for; ``resolve_conditions`` checks it against the model."""

    prompts: list[str] = field(default_factory=list)
    prompts_file: Path | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = None  # None: the model's default (its diffusers pipeline's)
    class_labels: list[int] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return (
            not self.prompts
            and self.prompts_file is None
            and self.negative_prompt is None
            and self.guidance_scale is None
            and not self.class_labels
        )


@dataclass
class Conditions:
    """The conditioning every model of one eval or comparison samples with, resolved for the model kind."""

    kind: str = "none"  # none | text | class
    guidance_scale: float = 1.0
    prompt_set: PromptSet | None = None
    negative_prompt: str | None = None
    class_labels: list[int] | None = None  # resolved: the labels given, else every class in turn

    @property
    def prompts(self) -> list[str] | None:
        return self.prompt_set.prompts if self.prompt_set is not None else None

    @property
    def has_prompts(self) -> bool:
        return self.prompt_set is not None

    def caption(self, index: int) -> str | None:
        """What sample ``index`` was asked for: its prompt, or its class, for grid captions."""
        if self.prompts:
            return self.prompts[index % len(self.prompts)]
        if self.class_labels:
            return f"class {self.class_labels[index % len(self.class_labels)]}"
        return None

    @property
    def period(self) -> int | None:
        """After how many samples the conditioning repeats (None: unconditional, or the empty prompt)."""
        if self.prompts:
            return len(self.prompts)
        if self.class_labels:
            return len(self.class_labels)
        return None

    def record(self) -> dict:
        return {
            "conditioning": self.kind,
            "guidance_scale": self.guidance_scale,
            "prompts": self.prompt_set.record() if self.prompt_set is not None else None,
            "negative_prompt": self.negative_prompt,
            "class_labels": self.class_labels,
        }


def resolve_conditions(request: ConditioningRequest, spec: ConditioningSpec, source: str) -> Conditions:
    """Check ``request`` against what the model takes (``spec``) and resolve defaults; options that mean
    nothing for the model are refused (BadSetting naming them)."""
    if request.prompts and request.prompts_file is not None:
        raise BadSetting("prompts", "give {prompt} or {prompts}, not both")
    if spec.kind != "text":
        for name, given in (
            ("prompt", request.prompts),
            ("prompts", request.prompts_file),
            ("negative_prompt", request.negative_prompt),
        ):
            if given:
                raise BadSetting(
                    name,
                    "{" + name + "} applies to text-conditional models; {source} is not one",
                    source=source,
                )
    if spec.kind != "class" and request.class_labels:
        raise BadSetting(
            "class_label",
            "{class_label} applies to class-conditional models; {source} is not one",
            source=source,
        )
    if spec.kind == "none" and request.guidance_scale is not None:
        raise BadSetting(
            "guidance_scale",
            "{guidance_scale} applies to conditional models; {source} is unconditional",
            source=source,
        )
    scale = spec.default_guidance_scale if request.guidance_scale is None else float(request.guidance_scale)
    if not math.isfinite(scale) or scale < 0:
        raise BadSetting("guidance_scale", "{guidance_scale} must be a number >= 0", got=scale)
    if scale != 1.0 and not spec.guidance:
        raise BadSetting(
            "guidance_scale",
            "{source} has no unconditional input (no null class or empty prompt): classifier-free guidance "
            "is not possible; leave {guidance_scale} at 1",
            source=source,
        )
    if request.negative_prompt is not None and scale == 1.0:
        raise BadSetting(
            "negative_prompt",
            "{negative_prompt} only acts under classifier-free guidance ({guidance_scale} != 1)",
        )
    if spec.kind == "none":
        return Conditions()
    if spec.kind == "text":
        prompt_set = None
        if request.prompts_file is not None:
            prompt_set = read_prompts_file(request.prompts_file)
        elif request.prompts:
            prompt_set = PromptSet(list(request.prompts))
        return Conditions("text", scale, prompt_set, request.negative_prompt)
    classes = int(spec.num_classes or 0)
    labels = [int(label) for label in request.class_labels] or list(range(classes))
    wrong = [label for label in labels if not 0 <= label < classes]
    if wrong:
        raise BadSetting(
            "class_label",
            "{class_label} {label} is out of range: {source} has {count} classes (0..{last})",
            source=source,
            label=wrong[0],
            count=classes,
            last=classes - 1,
        )
    return Conditions("class", scale, None, None, labels)


def conditions_from_record(record: dict | None, for_sampling: bool = True) -> Conditions | None:
    """The conditions a report recorded (its ``protocol``); None when it has none.

    ``for_sampling``: other models will sample with them, so the prompts must be there in full: given
    inline, or a prompt file still holding the same bytes (a BadSetting otherwise). Without it (grid
    captions) prompts are what the report kept in full, if anything."""
    if not record or record.get("conditioning") in (None, "none"):
        return None
    prompts = record.get("prompts") or {}
    prompt_set = PromptSet(list(prompts["prompts"])) if prompts.get("prompts") is not None else None
    if for_sampling and prompts.get("file"):
        if not Path(prompts["file"]).is_file():
            raise BadSetting(
                "reports",
                "{reports}: the report's prompt file {file} is gone; pass {prompts} to sample other models",
                file=prompts["file"],
            )
        prompt_set = read_prompts_file(Path(prompts["file"]))
        if prompt_set.file_sha256 != prompts.get("file_sha256"):
            raise BadSetting(
                "reports",
                "{reports}: the prompt file {file} changed since the report was made; pass the prompts "
                "again to sample other models",
                file=prompts["file"],
            )
    return Conditions(
        record["conditioning"],
        float(record.get("guidance_scale", 1.0)),
        prompt_set,
        record.get("negative_prompt"),
        record.get("class_labels"),
    )
