"""Plugin discovery and the registry of importance criteria and model adapters.

Plugins are found through entry points in the group ``dpcli``; the built-ins are entry points of the
``dpcli`` distribution itself and load first, so a third-party plugin can never shadow them. A plugin
that fails to import, or whose hook raises, is recorded as failed and skipped: the rest of ``dp`` works.

Environment variables:
    DPCLI_DISABLE_PLUGINS=1   load no third-party plugin (the built-ins always load)
    DPCLI_PLUGINS=a,b         load only these third-party plugins (entry-point or distribution names)
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from dpcli import hookspecs
from dpcli.errors import BadInput

ENTRY_POINT_GROUP = "dpcli"
BUILTIN_DISTRIBUTION = "dpcli"
KINDS = {"criterion": "dpcli_register_criteria", "adapter": "dpcli_register_adapters"}
_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass
class PluginInfo:
    """One plugin module: where it comes from and whether it loaded."""

    name: str
    package: str
    version: str
    builtin: bool
    status: str = "ok"  # ok | failed | disabled
    error: str | None = None


@dataclass
class Registration:
    """One criterion or adapter, and the plugin that registered it."""

    kind: str
    name: str
    obj: Any
    plugin: PluginInfo
    status: str = "ok"  # ok | rejected | conflict
    error: str | None = None

    @property
    def description(self) -> str:
        return str(getattr(self.obj, "description", "") or "")


@dataclass
class Registry:
    """What the loaded plugins provide. ``criteria`` and ``adapters`` hold only usable registrations."""

    plugins: list[PluginInfo] = field(default_factory=list)
    registrations: list[Registration] = field(default_factory=list)

    def usable(self, kind: str) -> dict[str, Registration]:
        return {r.name: r for r in self.registrations if r.kind == kind and r.status == "ok"}

    @property
    def criteria(self) -> dict[str, Any]:
        return {name: r.obj for name, r in self.usable("criterion").items()}

    @property
    def adapters(self) -> dict[str, Any]:
        return {name: r.obj for name, r in self.usable("adapter").items()}

    def get(self, kind: str, name: str) -> Any:
        """The criterion or adapter called ``name``; a clear BadInput when there is none."""
        usable = self.usable(kind)
        if name in usable:
            return usable[name].obj
        troubled = [r for r in self.registrations if r.kind == kind and r.name == name]
        if troubled:
            raise BadInput(troubled[0].error or f"{kind} '{name}' is unavailable")
        hint = difflib.get_close_matches(name, list(usable), n=3, cutoff=0.5)
        known = ", ".join(sorted(usable)) or "none"
        suggestion = f"; did you mean {' or '.join(repr(h) for h in hint)}?" if hint else ""
        raise BadInput(f"unknown {kind} '{name}'{suggestion} (available: {known})")

    def criterion(self, name: str) -> Any:
        return self.get("criterion", name)

    def adapter(self, name: str) -> Any:
        return self.get("adapter", name)

    def _register(self, kind: str, obj: Any, plugin: PluginInfo) -> None:
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not _NAME_PATTERN.match(name):
            raise ValueError(f"{kind} {obj!r} has no valid name (lower-case letters, digits, '-' or '_')")
        self.registrations.append(Registration(kind, name, obj, plugin))

    def _resolve_collisions(self) -> None:
        """Decide every name claimed more than once, after all hooks ran (so a plugin that failed half-way
        and had its registrations withdrawn leaves no trace). Built-ins load first and keep their names."""
        claims: dict[tuple[str, str], list[Registration]] = {}
        for registration in self.registrations:
            registration.status, registration.error = "ok", None
            claims.setdefault((registration.kind, registration.name), []).append(registration)
        for (kind, name), claimants in claims.items():
            builtin = next((r for r in claimants if r.plugin.builtin), None)
            if builtin is not None:
                for other in claimants:
                    if other is not builtin:
                        other.status = "rejected"
                        other.error = (
                            f"{kind} '{name}' from package '{other.plugin.package}' collides with the "
                            f"built-in one from '{builtin.plugin.package}'; the built-in is kept"
                        )
            elif len(claimants) > 1:
                # Between third-party packages neither wins silently: the name becomes unusable until
                # the user uninstalls or disables all but one of them.
                packages = [f"'{r.plugin.package}'" for r in claimants]
                who = f"both {packages[0]} and {packages[1]}" if len(packages) == 2 else ", ".join(packages)
                message = (
                    f"{kind} '{name}' is registered by {who}; uninstall one or select with DPCLI_PLUGINS"
                )
                for claimant in claimants:
                    claimant.status, claimant.error = "conflict", message


def _third_party_selection() -> tuple[bool, set[str] | None]:
    disabled = os.environ.get("DPCLI_DISABLE_PLUGINS", "").strip().lower() not in ("", "0", "false", "no")
    selected = os.environ.get("DPCLI_PLUGINS")
    only = None if selected is None else {s.strip() for s in selected.split(",") if s.strip()}
    return disabled, only


def _entry_points() -> list[metadata.EntryPoint]:
    found = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    unique = {(ep.name, ep.value, ep.dist.name if ep.dist else ""): ep for ep in found}
    # Built-ins first, then a stable order, so collisions resolve the same way on every run.
    return sorted(
        unique.values(), key=lambda ep: (not _is_builtin(ep), ep.dist.name if ep.dist else "", ep.name)
    )


def _is_builtin(ep: metadata.EntryPoint) -> bool:
    return bool(ep.dist) and ep.dist.name == BUILTIN_DISTRIBUTION


def _describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip().splitlines()[0]


def load_registry(
    extra_plugins: list[tuple[str, Any]] | None = None, third_party: bool | None = None
) -> Registry:
    """Discover plugins and collect what they register.

    :param extra_plugins: ``(name, plugin_object)`` pairs registered after the entry points, as
        third-party plugins (tests and ``dpcli.testing`` use this instead of installing a package).
    :param third_party: force third-party loading on or off; by default the environment decides.
    """
    disabled, only = _third_party_selection()
    if third_party is not None:
        disabled, only = not third_party, None
    manager = pluggy.PluginManager("dpcli")
    manager.add_hookspecs(hookspecs)
    registry = Registry()
    loaded: list[tuple[PluginInfo, Any]] = []

    for ep in _entry_points():
        dist = ep.dist
        info = PluginInfo(
            name=ep.name,
            package=dist.name if dist else "?",
            version=dist.version if dist else "?",
            builtin=_is_builtin(ep),
        )
        registry.plugins.append(info)
        if not info.builtin and (disabled or (only is not None and not {ep.name, info.package} & only)):
            info.status = "disabled"
            continue
        try:
            loaded.append((info, ep.load()))
        except (Exception, SystemExit) as exc:  # a broken plugin must not break dp
            info.status, info.error = "failed", f"import failed: {_describe_error(exc)}"

    for name, obj in extra_plugins or []:
        info = PluginInfo(
            name=name, package=getattr(obj, "__package__", None) or name, version="", builtin=False
        )
        registry.plugins.append(info)
        loaded.append((info, obj))

    for info, plugin in loaded:
        try:
            manager.register(plugin, name=f"{info.package}:{info.name}")
        except Exception as exc:
            info.status, info.error = "failed", f"invalid plugin: {_describe_error(exc)}"
            continue
        unknown = sorted(c.name for c in manager.get_hookcallers(plugin) or [] if not c.has_spec())
        if unknown:  # a misspelled hook would otherwise do nothing, silently
            info.status = "failed"
            info.error = (
                f"invalid plugin: unknown hook {', '.join(unknown)} (known: {', '.join(KINDS.values())})"
            )
            manager.unregister(plugin)
            continue
        for kind, hook_name in KINDS.items():
            if info.status != "ok":
                break
            impl = getattr(plugin, hook_name, None)
            if impl is None:
                continue
            try:
                impl(register=lambda obj, kind=kind, info=info: registry._register(kind, obj, info))
            except (Exception, SystemExit) as exc:
                info.status, info.error = "failed", f"{hook_name} raised {_describe_error(exc)}"
                # What a half-run hook managed to register is withdrawn with it.
                registry.registrations = [r for r in registry.registrations if r.plugin is not info]
    registry._resolve_collisions()
    return registry


_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _registry
    if _registry is None:
        _registry = load_registry()
    return _registry


def set_registry(registry: Registry | None) -> None:
    """Replace the process-wide registry (``None`` reloads on next use); for tests and embedding."""
    global _registry
    _registry = registry
