"""``dp plugins``: installed criteria and adapters, then plugin-level failures."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from dpcli.cli.render import stdout


def render_plugins(data: dict) -> None:
    """Table of installed criteria and adapters, then plugin-level failures."""
    table = Table(title="dp plugins", title_justify="left")
    for column in ("kind", "name", "description", "package", "version", "origin", "status"):
        table.add_column(column)
    for row in data["criteria"] + data["adapters"]:
        status = (
            "[green]ok[/]"
            if row["status"] == "ok"
            else f"[red]{row['status']}[/]: {escape(row['error'] or '')}"
        )
        table.add_row(
            row["kind"],
            row["name"],
            escape(row["description"]),
            row["package"],
            row["version"],
            "built-in" if row["builtin"] else "third-party",
            status,
        )
    stdout.print(table)
    for plugin in data["plugins"]:
        if plugin["status"] == "failed":
            stdout.print(
                f"[red]failed plugin[/] {plugin['name']} ({plugin['package']} {plugin['version']}): "
                f"{escape(plugin['error'] or '')}"
            )
        elif plugin["status"] == "disabled":
            stdout.print(f"[yellow]disabled[/] {plugin['name']} ({plugin['package']} {plugin['version']})")
