"""The plugin mechanism: built-ins through the same hooks, failures isolated, collisions named."""

from types import SimpleNamespace

import pytest

from dpcli import plugins
from dpcli.adapters.base import ModelAdapter
from dpcli.errors import BadInput
from dpcli.hookspecs import hookimpl
from dpcli.testing import run_dp


class ToyAdapter(ModelAdapter):
    description = "toy adapter from a test plugin"

    def __init__(self, name):
        self.name = name


def plugin_registering(*names):
    class Plugin:
        @staticmethod
        @hookimpl
        def dpcli_register_adapters(register):
            for name in names:
                register(ToyAdapter(name))

    return Plugin()


class RaisingPlugin:
    @staticmethod
    @hookimpl
    def dpcli_register_adapters(register):
        register(ToyAdapter("half-done"))
        raise RuntimeError("boom in hook")


@pytest.fixture
def use_registry():
    def install(registry):
        plugins.set_registry(registry)
        return registry

    yield install
    plugins.set_registry(None)


def test_builtins_come_from_entry_points_of_dpcli():
    registry = plugins.load_registry(third_party=False)
    ddpm = registry.usable("adapter")["ddpm"]
    assert ddpm.plugin.builtin and ddpm.plugin.package == "dpcli"


def test_third_party_plugin_appears_in_dp_plugins(dp, use_registry):
    use_registry(plugins.load_registry(extra_plugins=[("toy", plugin_registering("toy"))]))
    data = dp("plugins", "--json").json
    toy = next(row for row in data["adapters"] if row["name"] == "toy")
    assert toy["builtin"] is False and toy["status"] == "ok"
    assert "toy adapter" in dp("plugins").stdout


def test_failing_hook_is_reported_and_skipped(dp, use_registry):
    registry = use_registry(plugins.load_registry(extra_plugins=[("raiser", RaisingPlugin())]))
    assert "half-done" not in registry.adapters and "ddpm" in registry.adapters
    data = dp("plugins", "--json").json
    raiser = next(p for p in data["plugins"] if p["name"] == "raiser")
    assert raiser["status"] == "failed" and "boom in hook" in raiser["error"]
    assert dp("inspect", "config:ddpm-digits", "--json").exit_code == 0


def test_plugin_that_fails_to_import_is_reported(monkeypatch, dp, use_registry):
    def broken_load():
        raise ImportError("No module named 'missing_dependency'")

    fake = SimpleNamespace(
        name="broken",
        value="broken_pkg.plugin",
        dist=SimpleNamespace(name="broken-pkg", version="9.9"),
        load=broken_load,
    )
    original = plugins._entry_points
    monkeypatch.setattr(plugins, "_entry_points", lambda: [*original(), fake])
    use_registry(plugins.load_registry())
    broken = next(p for p in dp("plugins", "--json").json["plugins"] if p["name"] == "broken")
    assert broken["status"] == "failed" and "missing_dependency" in broken["error"]
    assert broken["package"] == "broken-pkg"


def test_disable_env_var_skips_third_party(monkeypatch):
    loaded = []
    fake = SimpleNamespace(
        name="third",
        value="x",
        dist=SimpleNamespace(name="third-pkg", version="1"),
        load=lambda: loaded.append(1),
    )
    original = plugins._entry_points
    monkeypatch.setattr(plugins, "_entry_points", lambda: [*original(), fake])
    monkeypatch.setenv("DPCLI_DISABLE_PLUGINS", "1")
    registry = plugins.load_registry()
    assert loaded == [] and "ddpm" in registry.adapters
    assert next(p for p in registry.plugins if p.name == "third").status == "disabled"


def test_name_taken_from_builtin_is_rejected_naming_both():
    registry = plugins.load_registry(extra_plugins=[("impostor", plugin_registering("ddpm"))])
    assert type(registry.adapters["ddpm"].implementation).__name__ == "DDPMAdapter"
    rejected = [r for r in registry.registrations if r.status == "rejected"]
    assert len(rejected) == 1 and "impostor" in rejected[0].error and "dpcli" in rejected[0].error


def test_two_third_party_plugins_claiming_one_name_is_an_error_naming_both(dp, use_registry):
    use_registry(
        plugins.load_registry(
            extra_plugins=[("first", plugin_registering("shared")), ("second", plugin_registering("shared"))]
        )
    )
    result = dp("inspect", "config:ddpm-digits", "--adapter", "shared")
    assert result.exit_code == 2
    assert "'first'" in result.stderr and "'second'" in result.stderr


def test_unknown_name_suggests_close_match():
    registry = plugins.load_registry(third_party=False)
    with pytest.raises(BadInput, match="did you mean 'ddpm'"):
        registry.adapter("dpm")


class MisspelledPlugin:
    @staticmethod
    @hookimpl
    def dpcli_register_criterias(register):
        raise AssertionError("never called")


def test_misspelled_hook_is_reported_instead_of_ignored():
    registry = plugins.load_registry(extra_plugins=[("typo", MisspelledPlugin())])
    typo = next(p for p in registry.plugins if p.name == "typo")
    assert typo.status == "failed" and "unknown hook dpcli_register_criterias" in typo.error


def test_plugin_calling_sys_exit_on_import_is_isolated(monkeypatch):
    def exiting_load():
        raise SystemExit(3)

    fake = SimpleNamespace(
        name="exits",
        value="exits.plugin",
        dist=SimpleNamespace(name="exits-pkg", version="1"),
        load=exiting_load,
    )
    original = plugins._entry_points
    monkeypatch.setattr(plugins, "_entry_points", lambda: [*original(), fake])
    registry = plugins.load_registry()
    assert next(p for p in registry.plugins if p.name == "exits").status == "failed"
    assert "ddpm" in registry.adapters


def test_withdrawn_registrations_leave_no_false_conflict():
    registry = plugins.load_registry(
        extra_plugins=[("good", plugin_registering("shared")), ("raiser", RaisingSharedPlugin())]
    )
    assert "shared" in registry.adapters
    assert next(p for p in registry.plugins if p.name == "raiser").status == "failed"


class RaisingSharedPlugin:
    @staticmethod
    @hookimpl
    def dpcli_register_adapters(register):
        register(ToyAdapter("shared"))
        raise RuntimeError("boom after claiming 'shared'")


def plugin_with(adapter):
    class Plugin:
        @staticmethod
        @hookimpl
        def dpcli_register_adapters(register):
            register(adapter)

    return Plugin()


def test_an_adapter_built_on_the_old_loaded_model_fields_is_refused_with_one_line(tmp_path):
    from dpcli.adapters.base import LoadedModel, ModelAdapter
    from dpcli.testing import make_unet

    class OldFields(ModelAdapter):  # LoadedModel(adapter=NAME, pruning=...) as before the renames
        name = "old-fields"

        def load(self, source, config=None):
            model = make_unet()
            return LoadedModel(model=model, adapter=self.name, source=source.spec, source_kind="test",
                               config=dict(model.config), sample_size=16, in_channels=3, pruning=None)  # fmt: skip

    result = run_dp(
        "inspect", "config:ddpm-digits", "--adapter", "old-fields", plugins=[plugin_with(OldFields())]
    )
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "adapter 'old-fields' was written for an older dpcli" in line and "now adapter_name" in line


def test_an_adapter_with_the_old_sampling_signature_still_samples(tmp_path):
    from dpcli.adapters.unet2d import DDPMAdapter
    from dpcli.testing import save_tiny_unet

    seen = []

    class OldSampling(DDPMAdapter):  # `generator` was always given a list of generators, positionally
        name = "old-sampling"

        def sampling_conditioning(self, loaded, batch_size, generator=None, **options):
            seen.append(len(generator))
            return None

    model = save_tiny_unet(tmp_path / "unet")
    args = [
        "--adapter",
        "old-sampling",
        "--num-samples",
        "2",
        "--steps",
        "2",
        "--no-latency",
        "-o",
        tmp_path / "e",
    ]
    result = run_dp("eval", model, *args, plugins=[plugin_with(OldSampling())])
    assert result.exit_code == 0, result.stderr
    assert seen == [2]


def test_a_lazy_adapter_whose_class_cannot_be_imported_fails_with_one_line():
    from dpcli.adapters.base import LazyAdapter

    broken = LazyAdapter("broken", "x", detect=lambda source: 0.0, target="no_such_module:Adapter")
    result = run_dp("inspect", "config:ddpm-digits", "--adapter", "broken", plugins=[plugin_with(broken)])
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert "adapter 'broken' cannot import its implementation no_such_module:Adapter" in result.stderr
