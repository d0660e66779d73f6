"""Every model folder dp writes carries a model card (README.md): what was pruned, how, and how to load it."""

from __future__ import annotations

import re

import pytest
import yaml

import dpcli
from dpcli.errors import BadInput
from dpcli.io.model_card import front_matter, update_model_card
from dpcli.testing import make_image_folder, save_tiny_unet


def card(folder) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, flags=re.DOTALL)
    assert match, "the card starts with YAML front matter"
    return yaml.safe_load(match.group(1)), match.group(2)


def test_pruned_then_finetuned_folders_describe_the_pruning_and_the_history_once(dp, tmp_path):
    model = save_tiny_unet(tmp_path / "unet")
    images = make_image_folder(tmp_path / "images")
    pruned = dp(
        "prune", model, "--criterion", "diff-taylor", "--data", images, "--calib-size", "4", "--timesteps",
        "6", "--threshold", "0.1", "--workers", "0", "--ratio", "0.3", "-o", tmp_path / "pruned", "--json",
    )  # fmt: skip
    assert pruned.exit_code == 0, pruned.stderr
    meta, body = card(tmp_path / "pruned")
    assert meta["library_name"] == "dpcli" and "base_model" not in meta  # a local folder is no Hub id
    assert {"dpcli", "pruning", "diff-taylor"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "unconditional-image-generation"
    report = pruned.json
    assert "| criterion | `diff-taylor` |" in body and "| threshold | 0.1 |" in body
    assert f"| timestep cutoff | {report['cutoff']} |" in body
    assert f"({report['params_after'] / report['params_before']:.1%})" in body
    assert f"({report['macs_after'] / report['macs_before']:.1%})" in body

    tuned = dp(
        "finetune", tmp_path / "pruned", "--data", images, "--steps", "1", "--batch-size", "2",
        "--workers", "0", "-o", tmp_path / "tuned",
    )  # fmt: skip
    assert tuned.exit_code == 0, tuned.stderr
    meta, body = card(tmp_path / "tuned")
    assert "fine-tuned" in meta["tags"]
    for section in ("pruning", "history", "usage"):
        assert body.count(f"<!-- dpcli:section {section} -->") == 1
    history = body.split("## History")[1].split("<!--")[0]
    assert history.count("**prune**") == 1 and history.count("**fine-tune** 1 steps") == 1
    assert "| criterion | `diff-taylor` |" in body  # the pruning carried over from the pruned folder


def test_the_cards_two_lines_of_python_load_the_model_as_a_pipeline(tmp_path, monkeypatch):
    from diffusers import DDIMPipeline

    pruned = dpcli.prune(dpcli.load(save_tiny_unet(tmp_path / "unet")), criterion="magnitude", ratio=0.3)
    pruned.save(tmp_path / "pruned")
    code = re.search(r"```python\n(.*?)```", (tmp_path / "pruned" / "README.md").read_text(), re.DOTALL)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(code.group(1), namespace)
    assert isinstance(namespace["pipe"], DDIMPipeline)
    assert namespace["pipe"].unet.conv_in.out_channels == pruned.module.conv_in.out_channels


def test_a_section_added_later_is_replaced_never_duplicated(tmp_path):
    dpcli.load(save_tiny_unet(tmp_path / "unet")).save(tmp_path / "model")
    update_model_card(tmp_path / "model", "evaluation", "FID 10.0")
    update_model_card(tmp_path / "model", "evaluation", "FID 9.5 (after more steps)")
    _, body = card(tmp_path / "model")
    assert body.count("## Evaluation") == 1 and "FID 9.5" in body and "FID 10.0" not in body
    assert body.rstrip().endswith("<!-- /dpcli:section evaluation -->")
    update_model_card(tmp_path / "model", "usage", "Replaced usage.")
    _, body = card(tmp_path / "model")
    assert body.count("## Usage") == 1 and "Replaced usage." in body and "## Evaluation" in body

    (tmp_path / "model" / "README.md").unlink()  # a folder from before cards: made from dpcli.json first
    update_model_card(tmp_path / "model", "evaluation", "FID 8")
    meta, body = card(tmp_path / "model")
    assert meta["library_name"] == "dpcli" and "## Pruning" in body and "FID 8" in body
    with pytest.raises(BadInput, match="section names"):
        update_model_card(tmp_path / "model", "Bad Name", "x")
    with pytest.raises(BadInput, match="not a dpcli model folder"):
        update_model_card(save_tiny_unet(tmp_path / "plain"), "evaluation", "x")


def test_front_matter_names_a_hub_base_model_and_text_to_image_models():
    info = {
        "base": {"source": "stabilityai/stable-diffusion-2-1-base"},
        "latent": {"conditioning": "text"},
        "pruning": {"criterion": "taylor"},
        "history": [{"step": "prune"}, {"step": "finetune"}],
    }
    meta = front_matter(info)
    assert meta["base_model"] == "stabilityai/stable-diffusion-2-1-base"
    assert meta["pipeline_tag"] == "text-to-image"
    assert {"taylor", "fine-tuned", "pruning"} <= set(meta["tags"])
    assert "base_model" not in front_matter({"base": {"source": "builtin:ddpm-digits"}})
