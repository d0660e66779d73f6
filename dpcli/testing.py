"""Helpers for testing dp plugins (and dp itself): tiny real models, tiny image folders, a CLI runner.

Everything here is public API for plugin authors (see docs/plugins.md, "Testing a plugin")::

    from dpcli.testing import make_image_folder, run_dp, save_tiny_unet
    import my_plugin

    def test_my_criterion_prunes(tmp_path):
        model = save_tiny_unet(tmp_path / "unet")
        data = make_image_folder(tmp_path / "images")
        result = run_dp("prune", model, "--criterion", "mine", "--data", data, "--ratio", "0.3",
                        "--calib-size", "4", "--timesteps", "4", "-o", tmp_path / "out", "--json",
                        plugins=[my_plugin])
        assert result.exit_code == 0, result.stderr
        assert result.json["params_after"] < result.json["params_before"]

``run_dp`` runs the real entry point in-process with the built-ins plus exactly the plugins you pass:
installed third-party plugins are left out unless ``third_party=True``, so tests do not depend on what
else happens to be installed. Models are built from real diffusers configs with random weights; nothing
is downloaded.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Attention at the second level, 8 norm groups: as cheap as a real UNet2DModel gets (16x16 RGB).
TINY_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DModel",
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": None,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "norm_eps": 1e-6,
}


@dataclass
class Result:
    """What a dp run produced: exit code, stdout and stderr (``json`` parses stdout)."""

    exit_code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)


def make_unet(config: dict | None = None, seed: int = 0):
    """A diffusers ``UNet2DModel`` from ``config`` (default ``TINY_UNET_CONFIG``), random weights from ``seed``."""
    import torch
    from diffusers import UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel.from_config(config or TINY_UNET_CONFIG).eval()


def tiny_loaded(seed: int = 0, config: dict | None = None):
    """A tiny UNet2DModel (``make_unet``) as the ``ddpm`` adapter's LoadedModel, with diffusers' default
    DDPMScheduler: for tests of scoring and pruning that need no model folder."""
    from diffusers import DDPMScheduler

    from dpcli.adapters.base import LoadedModel
    from dpcli.plugins import get_registry

    model = make_unet(config, seed=seed)
    config = dict(model.config)
    return LoadedModel(
        model=model,
        adapter_name="ddpm",
        source="tiny",
        source_kind="test",
        config=config,
        sample_size=config["sample_size"],
        in_channels=config["in_channels"],
        scheduler=DDPMScheduler(),
        adapter=get_registry().adapter("ddpm"),
    )


def save_tiny_unet(folder: Path, config: dict | None = None, seed: int = 0) -> Path:
    """Save a tiny ``UNet2DModel`` as a diffusers model folder (config.json + safetensors); returns ``folder``."""
    folder = Path(folder)
    make_unet(config, seed).save_pretrained(folder)
    return folder


def save_tiny_pipeline(
    folder: Path, config: dict | None = None, seed: int = 0, timesteps: int = 1000
) -> Path:
    """Save a tiny ``DDPMPipeline`` (UNet + DDIMScheduler with ``timesteps`` training steps); returns ``folder``."""
    from diffusers import DDIMScheduler, DDPMPipeline

    folder = Path(folder)
    unet = make_unet(config, seed)
    DDPMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=timesteps)).save_pretrained(folder)
    return folder


def make_image_folder(
    folder: Path, count: int = 8, size: int = 20, seed: int = 0, channels: int = 3, classes: int = 2
) -> Path:
    """A folder of ``count`` small random PNGs spread over ``classes`` sub-folders (exercises recursion)."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    for index in range(count):
        sub = folder / f"class{index % max(1, classes)}"
        sub.mkdir(parents=True, exist_ok=True)
        shape = (size, size, channels) if channels > 1 else (size, size)
        pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"img{index:03d}.png")
    return folder


def byte_level_tokenizer(folder: Path, max_length: int = 77):
    """A CLIP tokenizer with CLIP's byte alphabet and no merges, written offline into ``folder`` (no Hub
    download): prompts reach text encoders built from real configs in tests and benchmarks."""
    from transformers import CLIPTokenizer

    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    characters = [chr(c) for c in printable + [256 + i for i in range(256 - len(printable))]]
    vocab = {c: i for i, c in enumerate(characters)}
    vocab.update({c + "</w>": len(characters) + i for i, c in enumerate(characters)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def _plugin_pairs(plugins: Iterable[Any]) -> list[tuple[str, Any]]:
    pairs = []
    for plugin in plugins:
        if isinstance(plugin, tuple):
            pairs.append(plugin)
        else:
            name = getattr(plugin, "__name__", None) or type(plugin).__name__
            pairs.append((name.rsplit(".", 1)[-1], plugin))
    return pairs


@contextlib.contextmanager
def plugins_loaded(plugins: Iterable[Any] = (), third_party: bool = False) -> Iterator[Any]:
    """Within the block, dp's registry holds the built-ins plus ``plugins`` (modules, objects with hook
    implementations, or ``(name, plugin)`` pairs); installed third-party plugins too if ``third_party``.

    Yields the ``dpcli.plugins.Registry``; the previous registry is restored afterwards. Use it to test a
    plugin through the Python API (``dpcli.loading.load_model``, ``dpcli.jobs``) without installing it.
    """
    from dpcli import plugins as plugin_registry

    previous = plugin_registry._registry
    registry = plugin_registry.load_registry(extra_plugins=_plugin_pairs(plugins), third_party=third_party)
    plugin_registry.set_registry(registry)
    try:
        yield registry
    finally:
        plugin_registry.set_registry(previous)


def invoke(*args: Any) -> Result:
    """Run ``dp ARGS...`` in-process through the real entry point with the current registry, capturing
    stdout and stderr; exit codes and one-line errors are exactly what a user sees."""
    from dpcli.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return Result(code, out.getvalue(), err.getvalue())


def run_dp(*args: Any, plugins: Iterable[Any] = (), third_party: bool = False) -> Result:
    """Run ``dp ARGS...`` in-process with the built-ins plus exactly ``plugins`` loaded (see
    ``plugins_loaded``). Arguments may be paths; they are turned into strings."""
    with plugins_loaded(plugins, third_party=third_party):
        return invoke(*args)


def run_dp_subprocess(
    *args: Any, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float | None = 600
) -> Result:
    """Run ``python -m dpcli ARGS...`` in a fresh interpreter: entry-point discovery, environment variables
    (``DPCLI_PLUGINS``, ``HF_HUB_OFFLINE``, ``PYTHONPATH``) and start-up behave as for a user."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "dpcli", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)
