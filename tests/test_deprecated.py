"""Old import paths that the README or docs/plugins.md promised still work, with a DeprecationWarning."""

import pytest


def test_adapter_of_warns_and_gives_the_loaded_models_adapter():
    from conftest import tiny_loaded

    from dpcli.workflow import adapter_of

    loaded = tiny_loaded()
    with pytest.warns(DeprecationWarning, match="loaded.adapter_object"):
        assert adapter_of(loaded) is loaded.adapter_object
