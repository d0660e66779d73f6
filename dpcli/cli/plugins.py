"""``dp plugins``."""

from dpcli.cli.options import Json


def plugins(json_output: Json = False) -> None:
    """List installed importance criteria and model adapters, where each comes from, and its status."""
    from dpcli.cli import render as output
    from dpcli.cli.render.plugins import render_plugins
    from dpcli.plugins import get_registry

    registry = get_registry()
    data = {
        "plugins": [vars(p).copy() for p in registry.plugins],
        "criteria": [],
        "adapters": [],
    }
    for registration in registry.registrations:
        row = {
            "kind": registration.kind,
            "name": registration.name,
            "description": registration.description,
            "package": registration.plugin.package,
            "version": registration.plugin.version,
            "builtin": registration.plugin.builtin,
            "status": registration.status,
            "error": registration.error,
        }
        if registration.kind == "criterion":
            row["needs_data"] = bool(getattr(registration.obj, "needs_data", False))
            row["needs_gradients"] = bool(getattr(registration.obj, "needs_gradients", False))
            data["criteria"].append(row)
        else:
            data["adapters"].append(row)
    if json_output:
        output.print_json(data)
    else:
        render_plugins(data)
