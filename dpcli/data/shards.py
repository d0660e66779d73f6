"""WebDataset-style tar shards: ``shards/{000..099}.tar`` (brace patterns), a list of ``.tar`` files, or a
folder of them. A sample is the members sharing a key (the path up to the first dot of the file name,
webdataset's convention): an image (``jpg``/``jpeg``/``png``/``webp``/``bmp``), optionally a caption
(``txt``) and a class index (``cls``).

Opening indexes the shards once: tar headers are read (their data is skipped with seeks) and each sample's
image offset is kept, with its tiny caption and class members read then. Examples are then read by offset,
in any order, so a training batch is the same as from the image folder the shards were made of, and each
process reads only its own rows. Shards must be uncompressed (``.tar``): a compressed stream has no random
access. Memory: a few numbers and the caption per sample.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from dpcli.data.base import Example, Source, label_out_of_range
from dpcli.data.folder import read_image
from dpcli.errors import BadInput

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
CAPTION_EXTENSIONS = ("txt", "caption", "text")
LABEL_EXTENSIONS = ("cls", "label")


@dataclass(frozen=True)
class _Sample:
    shard: int
    key: str
    offset: int
    size: int
    caption: str | None
    label: int | None


def expand_shards(spec: str) -> list[Path]:
    """The shard files a spec names: a brace pattern, a comma-free path, or a folder of ``.tar`` files."""
    from braceexpand import braceexpand

    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.tar"))
    else:
        files = [Path(name).expanduser() for name in braceexpand(spec)]
    missing = [file for file in files if not file.is_file()]
    if missing:
        raise BadInput(f"shard not found: {missing[0]} (from {spec})")
    if not files:
        raise BadInput(f"no .tar shards in {spec}")
    return files


class TarShardSource(Source):
    """Samples of uncompressed tar shards, indexed once, read by offset."""

    kind = "shards"

    def __init__(self, spec: str):
        self.spec = spec
        self.shards = expand_shards(spec)
        self._versions = []
        samples: list[_Sample] = []
        for number, shard in enumerate(self.shards):
            stat = shard.stat()
            self._versions.append(f"{stat.st_size}-{stat.st_mtime_ns}")
            found = _index_shard(shard, number)
            if not found:
                raise BadInput(f"shard {shard} holds no samples (no {'/'.join(IMAGE_EXTENSIONS)} members)")
            samples.extend(found)
        self._samples = samples

    def __len__(self) -> int:
        return len(self._samples)

    def identity(self, index: int) -> tuple[str, str]:
        sample = self._samples[index]
        return f"{self.shards[sample.shard].name}/{sample.key}", self._versions[sample.shard]

    def example(self, index: int) -> Example:
        sample = self._samples[index]
        shard = self.shards[sample.shard]
        with open(shard, "rb") as file:
            file.seek(sample.offset)
            data = file.read(sample.size)
        image = read_image(io.BytesIO(data), f"{sample.key} in {shard}")
        return Example(image, sample.caption, sample.label, *self.identity(index))

    def caption(self, index: int) -> str | None:
        return self._samples[index].caption

    def label(self, index: int) -> int | None:
        return self._samples[index].label

    @property
    def has_captions(self) -> bool:
        return any(sample.caption is not None for sample in self._samples)

    def check_captions(self) -> None:
        if self.has_captions:
            missing = next((s for s in self._samples if s.caption is None), None)
            if missing is not None:
                raise BadInput(
                    f"sample {missing.key} in {self.shards[missing.shard]} has no .txt caption although "
                    "others have one; caption every sample or pass --prompt"
                )

    @property
    def has_labels(self) -> bool:
        return all(sample.label is not None for sample in self._samples)

    def check_labels(self, num_classes: int) -> None:
        unlabeled = next((s for s in self._samples if s.label is None), None)
        if unlabeled is not None:
            raise BadInput(
                f"sample {unlabeled.key} in {self.shards[unlabeled.shard]} has no .cls member, but the model "
                "is class-conditional: every sample needs a class index"
            )
        wrong = next((s for s in self._samples if not 0 <= s.label < num_classes), None)
        if wrong is not None:
            raise label_out_of_range(
                wrong.label, num_classes, f"sample {wrong.key} in {self.shards[wrong.shard]}"
            )

    def fingerprint(self) -> str:
        """Shard names and sizes and the sample count."""
        import hashlib

        digest = hashlib.sha256()
        for shard in self.shards:
            digest.update(f"{shard.name}\t{shard.stat().st_size}\n".encode())
        digest.update(str(len(self)).encode())
        return digest.hexdigest()


def _index_shard(shard: Path, number: int) -> list[_Sample]:
    """One pass over the shard's headers: each sample's image member (offset, size), caption and label."""
    from webdataset.tariterators import base_plus_ext

    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(shard, mode="r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, extension = base_plus_ext(member.name)
                if key is None:
                    continue
                members.setdefault(key, {})[extension.lower()] = member
            samples = []
            for key, parts in members.items():
                image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
                if image is None:
                    continue
                caption = _read_text(archive, parts, CAPTION_EXTENSIONS)
                label_text = _read_text(archive, parts, LABEL_EXTENSIONS)
                label = None
                if label_text is not None:
                    try:
                        label = int(label_text)
                    except ValueError:
                        raise BadInput(
                            f"{key}.cls in {shard} is not a class index: {label_text[:40]!r}"
                        ) from None
                samples.append(_Sample(number, key, image.offset_data, image.size, caption, label))
    except (tarfile.TarError, EOFError) as exc:
        raise BadInput(
            f"{shard} is not a readable tar shard ({exc or 'truncated'}); shards must be uncompressed .tar"
        ) from None
    except OSError as exc:
        raise BadInput(f"cannot read shard {shard}: {os.strerror(exc.errno) if exc.errno else exc}") from None
    return samples


def _read_text(archive: tarfile.TarFile, parts: dict[str, tarfile.TarInfo], extensions) -> str | None:
    member = next((parts[e] for e in extensions if e in parts), None)
    if member is None:
        return None
    return archive.extractfile(member).read().decode("utf-8").strip()
