"""``--cache-latents DIR``: the autoencoder latents of LDM training images, encoded once, reused across
steps, epochs and runs.

An entry is one safetensors file per (example, flip), named by a hash of the example's id and version (a
file's size and mtime: an edited image misses and is encoded again) and the flip. Entries live in a
sub-folder per (transform, autoencoder weights, format), so another resolution, crop or autoencoder never
reads them: a stale cache is a miss, never a wrong latent. An unreadable entry (a run killed while writing
cannot leave one: entries are written to a temp name and renamed) is encoded again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from dpcli import __version__
from dpcli.data.transforms import Geometry
from dpcli.errors import BadInput
from dpcli.io.files import atomic_write, read_json

CACHE_FORMAT = 2  # 2: each entry also keeps its image's geometry (size before resizing, crop corner)


class LatentCache:
    """Latents under ``root/<transform>-<autoencoder fingerprint>/``, keyed by (id, version, flip)."""

    def __init__(self, root: Path, autoencoder_fingerprint: str, transform_key: str):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise BadInput(f"--cache-latents {root} is a file, not a folder")
        self.folder = self.root / f"{transform_key}-ae{autoencoder_fingerprint[:16]}-v{CACHE_FORMAT}"
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = self.folder / "cache.json"
        facts = {
            "format": CACHE_FORMAT,
            "transform": transform_key,
            "autoencoder_fingerprint": autoencoder_fingerprint,
        }
        if manifest.is_file():
            recorded = read_json(manifest)
            if {key: recorded.get(key) for key in facts} != facts:
                raise BadInput(f"latent cache {self.folder} was written for other settings ({manifest})")
        else:
            with atomic_write(manifest) as temporary:
                temporary.write_text(json.dumps({**facts, "dpcli": __version__}, indent=2))

    def _file(self, identity: tuple[str, str], flip: bool) -> Path:
        digest = hashlib.sha256(f"{identity[0]}\0{identity[1]}\0{int(flip)}".encode()).hexdigest()
        return self.folder / digest[:2] / f"{digest[2:]}.safetensors"

    def get(self, identity: tuple[str, str], flip: bool) -> tuple[torch.Tensor, Geometry] | None:
        """The cached latent of one example and its image's geometry, or None (not cached yet, or
        unreadable)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        file = self._file(identity, flip)
        if not file.is_file():
            return None
        try:
            tensors = load_file(file)
            geometry = [int(v) for v in tensors["geometry"].tolist()]
            return tensors["latent"], Geometry((geometry[0], geometry[1]), (geometry[2], geometry[3]))
        except (SafetensorError, OSError, KeyError, ValueError, IndexError):
            return None

    def put(self, identity: tuple[str, str], flip: bool, latent: torch.Tensor, geometry: Geometry) -> None:
        from safetensors.torch import save_file

        file = self._file(identity, flip)
        file.parent.mkdir(exist_ok=True)
        place = torch.tensor([*geometry.original_size, *geometry.crop_top_left], dtype=torch.int64)
        with atomic_write(file, suffix=".safetensors") as temporary:
            save_file(
                {"latent": latent.detach().float().cpu().contiguous(), "geometry": place}, str(temporary)
            )

    def complete(self, batch, encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """All latents of ``batch`` in row order: the cached ones as read by the workers, the others
        encoded now with ``encode`` and written to the cache (with their image's geometry)."""
        encoded = encode(batch.pixels) if batch.pixel_rows else None
        rows: dict[int, torch.Tensor] = {}
        for position, row in enumerate(batch.pixel_rows):
            latent = encoded[position]
            self.put((batch.ids[row], batch.versions[row]), batch.flipped[row], latent, batch.geometry[row])
            rows[row] = latent
        device = encoded.device if encoded is not None else None
        dtype = encoded.dtype if encoded is not None else torch.float32
        rows.update({row: latent.to(device or latent.device, dtype) for row, latent in batch.cached.items()})
        return torch.stack([rows[row] for row in range(len(batch))])
