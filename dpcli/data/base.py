"""What every data source yields (``Example``), what it must offer (``Source``) and how ``--data`` is named
(``DataSpec``). Kept free of torch: opening a source costs a file listing or an index, never pixels."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dpcli.data.bad_samples import DEFAULT_MAX_BAD_FRACTION, DEFAULT_ON_BAD_SAMPLE, check_policy
from dpcli.errors import BadInput, BadSetting


@dataclass(frozen=True)
class DataSpec:
    """What ``--data`` and its companion options name: a source, and how to read it.

    ``source``: an image folder, a Hugging Face dataset (a ``save_to_disk`` folder, ``.parquet``/``.arrow``
    files, or ``hf:NAME`` from the local cache), tar shards (``shards/{000..099}.tar``) or ``builtin:digits``.
    ``split`` picks a split of a dataset with several; the ``*_column`` names override the guessed columns.
    ``on_bad_sample`` (``skip`` or ``fail``) and ``max_bad_fraction`` say what an undecodable example does
    (see ``dpcli.data.bad_samples``).
    """

    source: str
    split: str | None = None
    image_column: str | None = None
    caption_column: str | None = None
    label_column: str | None = None
    on_bad_sample: str = DEFAULT_ON_BAD_SAMPLE
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION

    def __post_init__(self):
        check_policy(self.on_bad_sample, self.max_bad_fraction)

    def __str__(self) -> str:
        return self.source


def data_spec(
    data,
    split=None,
    image_column=None,
    caption_column=None,
    label_column=None,
    on_bad_sample=None,
    max_bad_fraction=None,
) -> DataSpec | None:
    """The ``DataSpec`` that ``data`` and its companion settings name (``data`` may be one already: the
    bad-sample settings given replace its own); None without ``data``, where a companion setting given
    alone is a BadSetting. ``on_bad_sample``/``max_bad_fraction`` None: the defaults."""
    if data is None or data == "":
        for name, value in (
            ("split", split),
            ("image_column", image_column),
            ("caption_column", caption_column),
            ("label_column", label_column),
            ("on_bad_sample", on_bad_sample),
            ("max_bad_fraction", max_bad_fraction),
        ):
            if value is not None:
                raise BadSetting(name, "{" + name + "} needs {data}")
        return None
    policy = {
        name: value
        for name, value in (("on_bad_sample", on_bad_sample), ("max_bad_fraction", max_bad_fraction))
        if value is not None
    }
    if isinstance(data, DataSpec):
        return dataclasses.replace(data, **policy)
    return DataSpec(str(data), split, image_column, caption_column, label_column, **policy)


DATA_OPTIONS = (
    "split", "image_column", "caption_column", "label_column", "on_bad_sample", "max_bad_fraction"
)  # fmt: skip


@dataclass(kw_only=True)
class DataOptions:
    """The companions of a job's ``data`` setting, named as the options (``--split``, ...): the settings of
    score, prune, finetune and eval inherit them, and build their ``data`` with ``settings_data_spec``."""

    split: str | None = None
    image_column: str | None = None
    caption_column: str | None = None
    label_column: str | None = None
    on_bad_sample: str | None = None  # skip (the default) or fail: dpcli.data.bad_samples
    max_bad_fraction: float | None = None  # the cap on skipped examples (default 0.01)


def settings_data_spec(settings) -> DataSpec | None:
    """``data_spec`` of a job's settings, whose fields are named as the options (``data``, ``split``, ...)."""
    return data_spec(settings.data, *(getattr(settings, name) for name in DATA_OPTIONS))


@dataclass
class Example:
    """One training or calibration example, before any transform.

    ``image``: a PIL image, or a float tensor [C, H, W] in [0, 1] (built-in data). ``caption``/``label`` are
    None when the source has none. ``id`` is stable across runs and machines (a relative path, a row number,
    a shard member); ``version`` changes when the example's bytes may have changed (file size and mtime).
    """

    image: Any
    caption: str | None
    label: int | None
    id: str
    version: str = ""


class Source:
    """A data set with random access: ``len(source)``, ``source.example(i)``. Subclasses are picklable
    (DataLoader workers receive a copy) and hold an index, never decoded images."""

    kind: str = ""
    spec: str = ""
    on_bad_sample: str = DEFAULT_ON_BAD_SAMPLE  # set by ``open_source`` from the DataSpec
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION

    def __len__(self) -> int:
        raise NotImplementedError

    def example(self, index: int) -> Example:
        """Read and decode example ``index``; an unreadable one is a BadInput naming it."""
        raise NotImplementedError

    def identity(self, index: int) -> tuple[str, str]:
        """``(id, version)`` of example ``index`` without decoding it (the latent cache's key)."""
        raise NotImplementedError

    def caption(self, index: int) -> str | None:
        """The caption of example ``index`` (sources override this to skip decoding the image)."""
        return self.example(index).caption

    def label(self, index: int) -> int | None:
        """The class label of example ``index`` (sources override this to skip decoding the image)."""
        return self.example(index).label

    @property
    def has_captions(self) -> bool:
        return False

    def check_captions(self) -> None:
        """Either every example has a caption or none has (text models train on one or the other)."""

    @property
    def has_labels(self) -> bool:
        return False

    def check_labels(self, num_classes: int) -> None:
        """Every example has a class label in ``0..num_classes-1``; else a BadInput naming the first that
        does not (class-conditional models need labels)."""
        raise BadInput(
            f"{self.spec} has no class labels, but the model is class-conditional: use a folder with one "
            "sub-folder per class, a dataset with a label column, or shards with .cls members"
        )

    def fingerprint(self) -> str:
        """A SHA-256 that changes when the examples may have (reports record it beside the source's
        name). Default: a digest of every example's id and version."""
        import hashlib

        digest = hashlib.sha256()
        for index in range(len(self)):
            digest.update("{}\t{}\n".format(*self.identity(index)).encode())
        return digest.hexdigest()


def label_out_of_range(label: int, num_classes: int, where: str) -> BadInput:
    return BadInput(
        f"class label {label} ({where}) is out of range: the model has {num_classes} classes "
        f"(0..{num_classes - 1})"
    )
