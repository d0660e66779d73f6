"""The model card: a Hugging Face style ``README.md`` (YAML front matter + Markdown) in every model folder.

Written from ``dpcli.json`` by :func:`dpcli.io.model_format.write_model`, so every folder that ``dp prune``,
``dp finetune`` or ``Model.save()`` writes has one: what was pruned and how (criterion, threshold, cutoff,
params/MACs before and after), the fine-tune history and the two lines of Python that load it.

The body is made of named sections, each between ``<!-- dpcli:section NAME -->`` and
``<!-- /dpcli:section NAME -->``. :func:`update_model_card` replaces a section in place (or adds it), so
a later command (e.g. an evaluation) updates the card and never duplicates what it wrote before.
"""

from __future__ import annotations

import re
from pathlib import Path

from dpcli.errors import BadInput

CARD_FILE = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SECTION_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- dpcli:section {name} -->", f"<!-- /dpcli:section {name} -->"


def _section(name: str, title: str, text: str) -> str:
    start, end = _markers(name)
    return f"{start}\n## {title}\n\n{text.strip()}\n{end}\n"


def _count(value) -> str:
    if value is None:
        return "?"
    value = float(value)
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f}"


def _fraction(after, before) -> str:
    return f"{after / before:.1%}" if after is not None and before else "?"


def front_matter(info: dict) -> dict:
    """The card's YAML metadata: base model (when it is a Hub id), library, tags, pipeline tag."""
    base = str((info.get("base") or {}).get("source") or "")
    conditioning = (info.get("latent") or {}).get("conditioning")
    pipeline_tag = "text-to-image" if conditioning == "text" else "unconditional-image-generation"
    tags = ["dpcli", "diffusion", "diffusers"]
    if _is_sdxl(info):
        tags += ["stable-diffusion-xl", "sdxl"]
    pruning = info.get("pruning") or {}
    if pruning:
        tags += ["pruning", "structural-pruning"]
        if pruning.get("criterion"):
            tags.append(str(pruning["criterion"]))
    if any(entry.get("step") == "finetune" for entry in info.get("history") or []):
        tags.append("fine-tuned")
    matter: dict = {}
    if _HUB_ID.match(base) and not Path(base).exists():
        matter["base_model"] = base
    matter.update({"library_name": "dpcli", "pipeline_tag": pipeline_tag, "tags": tags})
    return matter


def _is_sdxl(info: dict) -> bool:
    return (info.get("latent") or {}).get("added_conditioning") == "text_time"


def _pruning_text(info: dict) -> str:
    pruning = info.get("pruning") or {}
    if not pruning:
        return "Not pruned: this folder holds the model at its original width."
    sizes = info.get("sizes") or {}
    scores = pruning.get("scores") or {}
    target = "ratio"
    if pruning.get("target_macs") is not None:
        target = f"target MACs {pruning['target_macs']:.0%} of the original"
    elif pruning.get("target_params") is not None:
        target = f"target params {pruning['target_params']:.0%} of the original"
    ratio = pruning.get("ratio")
    rows = [
        ("criterion", f"`{pruning.get('criterion')}`"),
        ("threshold", scores.get("threshold") if scores.get("threshold") is not None else "n/a"),
        ("timestep cutoff", pruning.get("cutoff") if pruning.get("cutoff") is not None else "n/a"),
        ("calibration data", scores.get("data") or "none"),
        ("goal", target),
        ("channel ratio removed", f"{ratio:.3f}" if isinstance(ratio, (int, float)) else "?"),
        ("head ratio", pruning.get("head_ratio") or 0),
        ("ignored modules", ", ".join(pruning.get("ignore") or []) or "none besides the output layer"),
        (
            "params",
            f"{_count(sizes.get('params_before'))} → {_count(sizes.get('params_after'))} "
            f"({_fraction(sizes.get('params_after'), sizes.get('params_before'))})",
        ),
        (
            "MACs (batch 1, native size)",
            f"{_count(sizes.get('macs_before'))} → {_count(sizes.get('macs_after'))} "
            f"({_fraction(sizes.get('macs_after'), sizes.get('macs_before'))})",
        ),
    ]
    table = "| | |\n|---|---|\n" + "".join(f"| {key} | {value} |\n" for key, value in rows)
    return (
        "Structural pruning with dpcli (Diff-Pruning, Fang et al., "
        "NeurIPS 2023): whole channels and attention heads were removed, so the model is smaller and "
        f"faster at the same resolution.\n\n{table}"
    )


def _history_line(entry: dict) -> str:
    step = entry.get("step")
    if step == "prune":
        return (
            f"- **prune** with `{entry.get('criterion')}` (ratio {entry.get('ratio', 0):.3f}): "
            f"{_count(entry.get('params_before'))} → {_count(entry.get('params_after'))} params, "
            f"{_count(entry.get('macs_before'))} → {_count(entry.get('macs_after'))} MACs"
        )
    if step == "finetune":
        loss = entry.get("final_loss")
        teacher = f", distilled from `{entry['teacher']}`" if entry.get("teacher") else ""
        return (
            f"- **fine-tune** {entry.get('steps')} steps at global batch {entry.get('global_batch')} on "
            f"`{entry.get('data')}` (lr {entry.get('lr')}, EMA {entry.get('ema_decay')}{teacher}); "
            f"final loss {loss:.4f}"
            if isinstance(loss, (int, float))
            else f"- **fine-tune** {entry.get('steps')} steps on `{entry.get('data')}`"
        )
    return f"- **{step}**"


def _usage_text(name: str, info: dict) -> str:
    conditioning = (info.get("latent") or {}).get("conditioning")
    call = 'pipe("a photo of a cat").images[0]' if conditioning == "text" else "pipe(batch_size=4).images"
    pipeline = "StableDiffusionXLPipeline" if _is_sdxl(info) else "pipeline"
    return (
        "Load it with dpcli (the pruned widths are rebuilt from `dpcli.json`; plain diffusers `from_pretrained` "
        "expects the original widths):\n\n"
        "```python\nimport dpcli\n"
        f'pipe = dpcli.load("{name}").pipeline()  # a diffusers {pipeline} with the pruned UNet\n```\n\n'
        f"then `images = {call}`, or `dp eval {name}` on the command line."
    )


def card_text(info: dict, name: str) -> str:
    """The whole card of a model folder named ``name`` with metadata ``info`` (its dpcli.json)."""
    import yaml

    base = (info.get("base") or {}).get("source") or "an unknown model"
    pruned = bool(info.get("pruning"))
    tuned = any(entry.get("step") == "finetune" for entry in info.get("history") or [])
    what = "pruned" if pruned else "saved"
    what += " and fine-tuned" if tuned else ""
    history = info.get("history") or []
    history_text = "\n".join(_history_line(entry) for entry in history) or "No recorded steps."
    parts = [
        "---\n" + yaml.safe_dump(front_matter(info), sort_keys=False) + "---\n",
        f"# {name}\n\n`{base}` {what} with dpcli {info.get('dpcli_version', '')} "
        f"(`{info.get('class', 'model')}`{', SDXL' if _is_sdxl(info) else ''}, adapter `{info.get('adapter')}`).\n",
        _section("pruning", "Pruning", _pruning_text(info)),
        _section("history", "History", history_text),
        _section("usage", "Usage", _usage_text(name, info)),
    ]
    return "\n".join(parts)


def write_model_card(folder: Path, info: dict, name: str | None = None) -> Path:
    """Write ``folder/README.md`` from ``info`` (the folder's dpcli.json); ``name`` is the folder's
    final name (default: ``folder``'s name)."""
    path = Path(folder) / CARD_FILE
    path.write_text(card_text(info, name or Path(folder).name))
    return path


def update_model_card(folder: Path, section: str, text: str, title: str | None = None) -> Path:
    """Put ``text`` into the card of the model ``folder`` as the section ``section`` (a lower-case name
    such as ``evaluation``), titled ``title`` (default: the name, capitalised): an existing section of
    that name is replaced, otherwise the section is added at the end. A dpcli folder without a card gets
    one first. The card is replaced atomically."""
    from dpcli.io.files import atomic_write
    from dpcli.io.model_format import read_metadata

    folder = Path(folder)
    if not _SECTION_NAME.match(section):
        raise BadInput(f"model card section names are lower-case words with - or _, got {section!r}")
    path = folder / CARD_FILE
    if path.is_file():
        card = path.read_text()
    else:
        info = read_metadata(folder)
        if info is None:
            raise BadInput(f"{folder} is not a dpcli model folder (no dpcli.json)")
        card = card_text(info, folder.name)
    start, end = _markers(section)
    block = _section(section, title or section.replace("-", " ").replace("_", " ").capitalize(), text)
    pattern = re.compile(re.escape(start) + r"\n.*?" + re.escape(end) + r"\n?", flags=re.DOTALL)
    if pattern.search(card):
        card = pattern.sub(lambda _: block, card, count=1)
    else:
        card = card.rstrip("\n") + "\n\n" + block
    with atomic_write(path) as temporary:
        temporary.write_text(card)
    return path
