"""The ``dedn`` command. The one place that wires dedn/, tuning/, cluster/ and tracking/ together;
each subcommand imports what it needs when it runs, so ``dedn --help`` stays fast."""

from __future__ import annotations

import sys
from typing import Any

import click

from dedn import __version__
from dedn.errors import DednInputError

__all__ = ["cli", "main"]


class _Group(click.Group):
    """Turns bad input into one line on stderr and exit status 2, instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DednInputError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dedn")
def cli() -> None:
    """Train, search and ship DEDN zero-shot classifiers.

    \b
    Examples:
      dedn data synth --builtin --out data/tiny
      dedn data inspect data/tiny
      dedn data convert xlsa17 --att-splits CUB/att_splits.mat --features CUB/res101.mat --out data/cub
    """


def _register() -> None:
    from cli.data import data
    from cli.models import predict, promote, ui
    from cli.search import search
    from cli.train import train

    cli.add_command(data)
    cli.add_command(train)
    cli.add_command(search)
    cli.add_command(promote)
    cli.add_command(predict)
    cli.add_command(ui)


_register()


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="dedn", standalone_mode=True)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
