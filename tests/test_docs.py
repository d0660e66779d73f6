"""docs/plugins.md documents every hook and every public adapter/criterion member, and its example works."""

import re
import types
from pathlib import Path

import pytest

from dpcli import hookspecs
from dpcli.adapters.base import ModelAdapter
from dpcli.criteria import Criterion
from dpcli.testing import run_dp, save_tiny_unet

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def sections() -> dict[str, str]:
    """The guide's level-2 sections by title."""
    parts = re.split(r"^## (.+)$", GUIDE.read_text(), flags=re.MULTILINE)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def documented_calls(text: str) -> set[str]:
    """Names documented with a heading like ### `name(args) -> result`."""
    return set(re.findall(r"^#{3,4} `(\w+)\(", text, flags=re.MULTILINE))


def public_methods(cls) -> set[str]:
    return {name for name, value in vars(cls).items() if callable(value) and not name.startswith("_")}


def public_attributes(cls) -> set[str]:
    return {name for name, value in vars(cls).items() if not callable(value) and not name.startswith("_")}


def test_every_hook_spec_has_a_section():
    specs = {name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "dpcli_spec")}
    assert specs == {"dpcli_register_criteria", "dpcli_register_adapters"}
    assert documented_calls(sections()["Hooks"]) == specs


def test_every_adapter_method_has_a_section_and_no_section_is_stale():
    assert documented_calls(sections()["Model adapters"]) == public_methods(ModelAdapter)


def test_every_criterion_method_has_a_section_and_no_section_is_stale():
    assert documented_calls(sections()["Criteria"]) == public_methods(Criterion)


@pytest.mark.parametrize("cls, section", [(Criterion, "Criteria"), (ModelAdapter, "Model adapters")])
def test_every_public_attribute_is_explained(cls, section):
    text = sections()[section]
    missing = [name for name in public_attributes(cls) if f"`{name}`" not in text]
    assert not missing, f"{cls.__name__} attributes not in the guide's {section!r} section: {missing}"


def test_the_guides_minimal_plugin_works_and_is_unknown_without_it(tmp_path):
    text = GUIDE.read_text()
    code = re.search(r"<!-- minimal-plugin -->\s*```python\n(.*?)```", text, flags=re.DOTALL).group(1)
    module = types.ModuleType("dpcli_l1")
    exec(compile(code, "docs/plugins.md", "exec"), module.__dict__)
    model = save_tiny_unet(tmp_path / "unet")
    args = ("prune", model, "--criterion", "l1", "--ratio", "0.3", "--json")
    before = run_dp(*args, "-o", tmp_path / "never")
    assert before.exit_code == 2 and "unknown criterion 'l1'" in before.stderr
    result = run_dp(*args, "-o", tmp_path / "out", plugins=[module])
    assert result.exit_code == 0, result.stderr
    assert result.json["criterion"] == "l1" and result.json["params_after"] < result.json["params_before"]


README = GUIDE.parent.parent / "README.md"
# The README's Python API section runs as written, with only these sizes made small (each must appear once).
README_SHORTCUTS = {
    "threshold=0.05)": "threshold=0.05, calib_size=4, timesteps=8)",
    "steps=1000": "steps=2, batch_size=4",
    "num_samples=256)": "num_samples=4, steps=10, latency=False)",
    "num_inference_steps=50).images": "num_inference_steps=3).images",
    "num_inference_steps=20)": "num_inference_steps=3)",
    "num_inference_steps=50)\n": "num_inference_steps=3)\n",
}


@pytest.mark.slow
def test_the_readmes_python_api_examples_run(tmp_path, monkeypatch):
    section = README.read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    code = "\n".join(re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL))
    for original, small in README_SHORTCUTS.items():
        assert code.count(original) == 1, original
        code = code.replace(original, small)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    import numpy as np

    assert namespace["pruned"] is namespace["model"]
    assert (
        0.5
        < namespace["pruned"].record["sizes"]["macs_after"]
        / namespace["pruned"].record["sizes"]["macs_before"]
        < 0.6
    )
    # builtin:ddpm-digits was itself trained by dp finetune: its history goes on
    assert [entry["step"] for entry in namespace["tuned"].record["history"]][-2:] == ["prune", "finetune"]
    assert np.isfinite(namespace["report"].to_json()["fid"])
    assert len(namespace["images"]) == 4 and namespace["same_as_dp_eval"].images[0].size == (16, 16)
    assert (tmp_path / "unet.onnx").is_file()
    card = (tmp_path / "tuned" / "README.md").read_text()
    assert card.count("## Evaluation") == 1 and "(256 samples)" in card
