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
