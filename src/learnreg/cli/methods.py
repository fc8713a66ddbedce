"""``learnreg methods``: the registered learned methods and their Table-1 attributes."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["register_command", "methods_table"]


def methods_table(show_config: bool = False) -> Table:
    """A rich table of every registered method (optionally with its config keys)."""
    from learnreg.methods.registry import available_methods, method_config_keys

    table = Table(title="Learned registration methods", show_lines=False)
    for col in ("method", "year", "n-D", "transform", "loss", "supervision", "reference"):
        table.add_column(col, overflow="fold")
    if show_config:
        table.add_column("config keys", overflow="fold")
    for m in available_methods():
        name = m.name + (f" ({', '.join(m.aliases)})" if m.aliases else "")
        row = [name, str(m.year), m.ndim, m.transform, m.loss, m.supervision, m.reference]
        if show_config:
            row.append(", ".join(method_config_keys(m.name)))
        table.add_row(*row)
    return table


def register_command(app: typer.Typer) -> None:
    """Add the ``methods`` command to ``app``."""

    @app.command("methods")
    def methods(
        config: Annotated[
            bool, typer.Option("--config", help="Also list each method's config keys.")
        ] = False,
    ) -> None:
        """List the learned registration methods: year, n-D, transform, loss, supervision."""
        Console().print(methods_table(config))
