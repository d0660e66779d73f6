"""Old import paths that the README or docs/plugins.md promised still work, with a DeprecationWarning."""

import importlib

import pytest

MOVED = [
    ("dpcli.workflow", "ScoreSettings", "dpcli.jobs.score"),
    ("dpcli.workflow", "compute_scores", "dpcli.jobs.score"),
    ("dpcli.workflow", "PruneSettings", "dpcli.jobs.prune"),
    ("dpcli.workflow", "prune_model", "dpcli.jobs.prune"),
    ("dpcli.workflow", "pruned_metadata", "dpcli.jobs.prune"),
    ("dpcli.evaluation", "EvalSettings", "dpcli.jobs.evaluate"),
    ("dpcli.evaluation", "evaluate", "dpcli.jobs.evaluate"),
    ("dpcli.training", "FinetuneSettings", "dpcli.jobs.finetune.settings"),
    ("dpcli.training", "finetune", "dpcli.jobs.finetune.loop"),
    ("dpcli.training", "save_finetuned", "dpcli.jobs.finetune.loop"),
]


@pytest.mark.parametrize("old, name, new", MOVED)
def test_old_import_path_warns_and_gives_the_moved_object(old, name, new):
    with pytest.warns(DeprecationWarning, match=f"import it from {new}"):
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(new), name)


def test_adapter_of_warns_and_gives_the_loaded_models_adapter():
    from conftest import tiny_loaded

    from dpcli.workflow import adapter_of

    loaded = tiny_loaded()
    with pytest.warns(DeprecationWarning, match="loaded.adapter"):
        assert adapter_of(loaded) is loaded.adapter
