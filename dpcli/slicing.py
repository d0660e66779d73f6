"""``dp slice``: carry an add-on made for the original model onto a pruned one.

A pruned folder records, per module, the channels pruning kept (``pruning.kept_channels``: ``in``/``out``
indices into the original widths) and the original widths (``original_modules``). With them:

- a **LoRA** (diffusers/PEFT layout ``unet.<module>.lora_A/B.weight``, or kohya layout
  ``lora_unet_<module with _>.lora_down/up.weight`` + ``.alpha``) is sliced exactly: A keeps the columns of
  the kept inputs, B the rows of the kept outputs, so ``B'A' == (BA)[kept_out][:, kept_in]`` and the
  pruned layer with the sliced LoRA computes what the original layer with the LoRA computes on the kept
  channels. Text-encoder entries pass through unchanged (the text encoder is not pruned). Modules the
  pruned model no longer has are dropped (with a note). The same layout is written back, as
  ``OUT/pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(OUT)``).
- a **ControlNet** (a diffusers ``ControlNetModel`` folder) adds its outputs to the UNet's skip
  connections and mid block: its output projections (``controlnet_down_blocks``, ``controlnet_mid_block``)
  keep the rows of the pruned UNet's kept channels of each skip. Its own trunk keeps its full width, so
  this is an approximation of the original pair (the pruned UNet itself is one). The sliced ControlNet's
  output widths differ from its config: load it with :func:`load_controlnet`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpcli.errors import BadInput

LORA_FILE = "pytorch_lora_weights.safetensors"
CONTROLNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
REPORT_FILE = "slice.json"
PEFT_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "magnitude"}
KOHYA_SUFFIXES = {".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha"}


@dataclass
class SliceReport:
    kind: str
    layout: str | None
    addon: str
    model: str
    sliced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    output: str | None = None

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "layout": self.layout,
            "addon": self.addon,
            "model": self.model,
            "modules_sliced": len(self.sliced),
            "modules_unchanged": len(self.unchanged),
            "modules_dropped": len(self.dropped),
            "sliced": self.sliced,
            "dropped": self.dropped,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "notes": self.notes,
            "output": self.output,
        }


@dataclass
class PrunedRecord:
    """What slicing needs from a pruned dpcli folder."""

    folder: Path
    kept: dict[str, dict[str, list[int]]]
    original: dict[str, dict]
    modules: dict[str, dict]
    layout: str


def read_pruned(folder: Path) -> PrunedRecord:
    from dpcli.io.model_format import read_metadata

    folder = Path(folder)
    info = read_metadata(folder) if folder.is_dir() else None
    if info is None:
        raise BadInput(f"--model {folder} is not a dpcli model folder (no dpcli.json)")
    pruning = info.get("pruning") or {}
    if "kept_channels" not in pruning:
        raise BadInput(f"--model {folder} records no kept channels (pruned by an older dpcli, or not pruned)")
    return PrunedRecord(
        folder,
        pruning["kept_channels"],
        info["original_modules"],
        info["modules"],
        pruning.get("layout", "free"),
    )


def slice_addon(addon: Path, model: Path, output: Path, force: bool = False) -> SliceReport:
    """Slice ``addon`` (a LoRA file or folder, or a ControlNetModel folder) for the pruned ``model`` folder
    and write it to the folder ``output`` (nothing is written when the add-on is refused)."""
    from dpcli.io.files import AtomicFolder, prepare_output

    addon, output = Path(addon), Path(output)
    if not addon.exists():
        raise BadInput(f"add-on {addon} does not exist")
    record = read_pruned(Path(model))
    prepare_output(output, force)
    config = addon / "config.json"
    if addon.is_dir() and config.is_file():
        kind = json.loads(config.read_text()).get("_class_name")
        if kind != "ControlNetModel":
            raise BadInput(
                f"{addon} is a {kind} folder; dp slice takes LoRA files and ControlNetModel folders"
            )
        tensors, report = slice_controlnet(addon, record)
        files = {CONTROLNET_WEIGHTS: (tensors, {"format": "pt"})}
        extra = {"config.json": config.read_text()}
    else:
        file = _lora_file(addon)
        tensors, metadata = _read_safetensors(file)
        tensors, report = slice_lora(tensors, record)
        report.addon = str(addon)
        files = {LORA_FILE: (tensors, metadata)}
        extra = {}
    report.addon, report.model, report.output = str(addon), str(model), str(output)
    from safetensors.torch import save_file

    with AtomicFolder(output, force=force) as folder:
        for name, (state, metadata) in files.items():
            save_file({k: v.contiguous() for k, v in state.items()}, str(folder / name), metadata=metadata)
        for name, text in extra.items():
            (folder / name).write_text(text)
        (folder / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=2))
    return report


def _lora_file(addon: Path) -> Path:
    if addon.is_dir():
        candidates = sorted(addon.glob("*.safetensors"))
        if len(candidates) != 1:
            raise BadInput(f"{addon} holds {len(candidates)} .safetensors files; give the LoRA file itself")
        return candidates[0]
    if addon.suffix != ".safetensors":
        raise BadInput(f"{addon}: a LoRA must be a .safetensors file")
    return addon


def _read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise BadInput(f"{file} is not a readable safetensors file ({exc})") from exc


def _split_key(key: str) -> tuple[str, str, str] | None:
    """``(layout, module, part)`` of a LoRA key, or None for keys that are not about the UNet."""
    if key.startswith("unet."):
        for suffix, part in PEFT_SUFFIXES.items():
            if key.endswith(suffix):
                return "peft", key[len("unet.") : -len(suffix)], part
        raise BadInput(f"LoRA entry {key} is not lora_A/lora_B: not a LoRA layout dp slice knows")
    if key.startswith("lora_unet_"):
        for suffix, part in KOHYA_SUFFIXES.items():
            if key.endswith(suffix):
                return "kohya", key[len("lora_unet_") : -len(suffix)], part
        raise BadInput(f"LoRA entry {key} is not lora_down/lora_up/alpha: not a LoRA layout dp slice knows")
    return None


def slice_lora(tensors: dict[str, torch.Tensor], record: PrunedRecord) -> tuple[dict, SliceReport]:
    """The LoRA ``tensors`` sliced to ``record``'s kept channels (see the module docstring)."""
    parsed = {key: _split_key(key) for key in tensors}
    layouts = {p[0] for p in parsed.values() if p is not None}
    if not layouts:
        raise BadInput("the add-on has no UNet LoRA entries (unet.*.lora_A/B or lora_unet_*.lora_down/up)")
    if len(layouts) > 1:
        raise BadInput("the LoRA mixes the diffusers and kohya layouts")
    layout = layouts.pop()
    names = {name: name for name in record.original}
    if layout == "kohya":
        names = {name.replace(".", "_"): name for name in record.original}
    modules: dict[str, dict[str, str]] = {}
    for key, parts in parsed.items():
        if parts is not None:
            _, module, part = parts
            if module not in names:
                raise BadInput(
                    f"the LoRA is for another model: {module} is not a module of the original UNet"
                )
            modules.setdefault(names[module], {})[part] = key
    report = SliceReport("lora", layout, "", "")
    result: dict[str, torch.Tensor] = {k: v for k, v in tensors.items() if parsed[k] is None}
    for name, parts in sorted(modules.items()):
        if "A" not in parts or "B" not in parts:
            raise BadInput(f"the LoRA has no {'up/B' if 'A' in parts else 'down/A'} matrix for {name}")
        down, up = tensors[parts["A"]], tensors[parts["B"]]
        spec = record.original[name]
        width_in, width_out = _lora_widths(spec)
        rank = down.shape[0]
        if down.dim() < 2 or down.shape[1] != width_in or up.shape[0] != width_out or up.shape[1] != rank:
            raise BadInput(
                f"the LoRA is for another model: {name} has A {tuple(down.shape)} and B {tuple(up.shape)}, "
                f"the original layer is {width_in} -> {width_out}"
            )
        report.params_before += sum(tensors[k].numel() for k in parts.values())
        if name not in record.modules:
            report.dropped.append(name)
            report.notes.append(f"{name}: the pruned model has no such module; its LoRA is dropped")
            continue
        kept = record.kept.get(name, {})
        new_down, new_up = down, up
        if "in" in kept:
            new_down = down.index_select(1, torch.tensor(kept["in"]))
        if "out" in kept:
            new_up = up.index_select(0, torch.tensor(kept["out"]))
        result[parts["A"]], result[parts["B"]] = new_down, new_up
        if "alpha" in parts:
            result[parts["alpha"]] = tensors[parts["alpha"]]
        if "magnitude" in parts:
            magnitude = tensors[parts["magnitude"]]
            result[parts["magnitude"]] = (
                magnitude.index_select(0, torch.tensor(kept["out"])) if "out" in kept else magnitude
            )
        (report.sliced if kept else report.unchanged).append(name)
        report.params_after += sum(result[k].numel() for k in parts.values())
    return result, report


def _lora_widths(spec: dict) -> tuple[int, int]:
    if "in_channels" not in spec:
        raise BadInput(f"a LoRA on a {spec.get('type')} module cannot be sliced")
    groups = int(spec.get("groups", 1) or 1)
    if groups != 1:
        raise BadInput("a LoRA on a grouped convolution cannot be sliced")
    return int(spec["in_channels"]), int(spec["out_channels"])


def skip_sources(unet_config: dict, original: dict) -> tuple[list[str], str]:
    """The UNet modules whose output channels are its skip connections (in order) and the mid block's
    output: conv_in, each down block's resnets (an attention's output shares its resnet's channels: one
    residual stream) and its downsampler."""
    sources = ["conv_in"]
    layers = unet_config.get("layers_per_block", 2)
    blocks = unet_config["down_block_types"]
    for index in range(len(blocks)):
        count = layers[index] if isinstance(layers, (list, tuple)) else layers
        sources += [f"down_blocks.{index}.resnets.{i}.conv2" for i in range(count)]
        if index < len(blocks) - 1:
            sources.append(f"down_blocks.{index}.downsamplers.0.conv")
    mids = sorted(
        (
            int(name.split(".")[2])
            for name in original
            if name.startswith("mid_block.resnets.") and name.endswith(".conv2")
        ),
    )
    if not mids:
        raise BadInput("the pruned UNet has no mid block resnets for the ControlNet's mid output")
    return sources, f"mid_block.resnets.{mids[-1]}.conv2"


def slice_controlnet(folder: Path, record: PrunedRecord) -> tuple[dict, SliceReport]:
    """The ControlNet's weights with its output projections cut to the pruned UNet's kept skip channels."""
    from dpcli.io.weights import load_tensor_file

    weights = folder / CONTROLNET_WEIGHTS
    if not weights.is_file():
        raise BadInput(f"{weights} is missing (dp slice reads the safetensors weights of a ControlNetModel)")
    tensors = load_tensor_file(weights)
    config = json.loads((folder / "config.json").read_text())
    unet_config = _unet_config(record)
    sources, mid = skip_sources(unet_config, record.original)
    outputs = [f"controlnet_down_blocks.{i}" for i in range(len(sources))] + ["controlnet_mid_block"]
    if f"controlnet_down_blocks.{len(sources)}.weight" in tensors or any(
        f"{o}.weight" not in tensors for o in outputs
    ):
        raise BadInput(
            f"the ControlNet {folder} was made for another UNet layout (its outputs do not match the skips)"
        )
    report = SliceReport("controlnet", None, "", "")
    report.params_before = sum(t.numel() for t in tensors.values())
    for output, source in zip(outputs, [*sources, mid], strict=True):
        weight = tensors[f"{output}.weight"]
        width = record.original.get(source, {}).get("out_channels")
        if width is None or weight.shape[0] != width:
            raise BadInput(
                f"the ControlNet is for another model: {output} gives {weight.shape[0]} channels, "
                f"the original UNet's {source} has {width}"
            )
        kept = record.kept.get(source, {}).get("out")
        if kept is None:
            report.unchanged.append(output)
            continue
        index = torch.tensor(kept)
        tensors[f"{output}.weight"] = weight.index_select(0, index)
        if f"{output}.bias" in tensors:
            tensors[f"{output}.bias"] = tensors[f"{output}.bias"].index_select(0, index)
        report.sliced.append(output)
    report.params_after = sum(t.numel() for t in tensors.values())
    report.notes.append(
        "approximation: the ControlNet's own trunk keeps its full width; only its outputs follow the pruned "
        f"UNet's channels ({config.get('block_out_channels')} trunk)"
    )
    return tensors, report


def _unet_config(record: PrunedRecord) -> dict:
    from dpcli.io.model_format import read_metadata

    info = read_metadata(record.folder)
    details = (info.get("pruning") or {}).get("layout_details") or {}
    return details.get("original_config") or info["base"]["config"]


def load_controlnet(folder: str | Path, dtype: torch.dtype | None = None, device=None):
    """A ControlNetModel from a ``dp slice`` folder (or one its loaded model was ``save_pretrained`` to):
    built from its config, the output projections given the widths of the sliced weights, the weights
    loaded strictly. Its outputs are the original ControlNet's at the pruned UNet's kept channels.

    Plain ``ControlNetModel.from_pretrained`` refuses such a folder (size mismatch): diffusers ties each
    output projection's width to the ControlNet's own ``block_out_channels``, and the trunk keeps the
    original widths, so no diffusers config describes it, in either layout. Plug it into the pruned
    pipeline::

        from diffusers import StableDiffusionControlNetPipeline
        pipe = StableDiffusionControlNetPipeline.from_pipe(dpcli.load(PRUNED).pipeline(),
                                                           controlnet=load_controlnet(SLICED))
        # a --layout diffusers model, without dpcli for the rest of the pipeline:
        pipe = StableDiffusionControlNetPipeline.from_pretrained(PRUNED, controlnet=load_controlnet(SLICED))
    """
    from diffusers import ControlNetModel

    from dpcli.io.diffusers_files import folder_weights, load_weights_into

    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise BadInput(f"{folder} is not a ControlNet folder (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInput(f"{config_file} is not readable JSON ({exc})") from exc
    if config.get("_class_name") != "ControlNetModel":
        raise BadInput(f"{folder} holds a {config.get('_class_name')}, not a ControlNetModel")
    state = folder_weights(folder)
    model = ControlNetModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    names = [f"controlnet_down_blocks.{i}" for i in range(len(model.controlnet_down_blocks))]
    convs = [*model.controlnet_down_blocks, model.controlnet_mid_block]
    for conv, name in zip(convs, [*names, "controlnet_mid_block"], strict=True):
        weight = state.get(f"{name}.weight")
        if weight is None or weight.dim() != 4 or tuple(weight.shape[1:]) != tuple(conv.weight.shape[1:]):
            found = "nothing" if weight is None else tuple(weight.shape)
            raise BadInput(
                f"the weights in {folder} do not fit its config: {name}.weight is {found}, "
                f"expected (N, {', '.join(map(str, conv.weight.shape[1:]))})"
            )
        width = weight.shape[0]
        if width != conv.out_channels:
            conv.out_channels = width
            conv.weight = torch.nn.Parameter(torch.empty(width, *conv.weight.shape[1:]))
            conv.bias = torch.nn.Parameter(torch.empty(width)) if conv.bias is not None else None
    load_weights_into(model, state, str(folder))
    return model.to(device=device, dtype=dtype).eval()


def slice(  # noqa: A001
    addon: str | Path, model, output: str | Path, *, force: bool = False, reporter=None
) -> SliceReport:
    """``dp slice``: ``addon`` (a LoRA file/folder or a ControlNetModel folder) carried onto the pruned
    ``model`` (its folder, or a ``dpcli.Model`` loaded from one), written to the folder ``output``.
    Returns the report (``.to_json()`` is what ``dp slice --json`` prints); ``reporter`` (a
    ``dpcli.reporting.Reporter``) hears its status."""
    from dpcli.io.files import output_lock
    from dpcli.reporting import silent

    reporter = silent(reporter)
    folder = getattr(model, "source", model)
    with output_lock(Path(output), on_note=reporter.warn):
        reporter.status("Slicing")
        return slice_addon(Path(addon), Path(folder), Path(output), force=force)
