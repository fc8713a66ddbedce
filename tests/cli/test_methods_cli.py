"""``learnreg methods``: a table of every registered method with its Table-1 attributes."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from learnreg.cli.methods import register_command
from learnreg.methods.registry import available_methods


def _app() -> typer.Typer:
    app = typer.Typer()
    register_command(app)

    @app.callback()
    def main() -> None:  # keep `methods` a named subcommand
        pass

    return app


def test_methods_command_lists_every_method():
    result = CliRunner().invoke(_app(), ["methods"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for m in available_methods():
        assert m.name in result.output
        assert str(m.year) in result.output
        assert m.reference.split(",")[0] in result.output
    for header in ("year", "n-D", "transform", "loss", "supervision", "reference"):
        assert header in result.output
    assert "Dalca et al." in result.output and "unsupervised" in result.output


def test_methods_command_config_keys():
    result = CliRunner().invoke(_app(), ["methods", "--config"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "prior_lambda" in result.output and "dice_weight" in result.output
