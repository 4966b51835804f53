"""The ``dedn`` command. The one place that wires dedn/, tuning/, cluster/ and tracking/ together;
each subcommand imports what it needs when it runs, so ``dedn --help`` stays fast."""

from __future__ import annotations

import sys
from typing import Any

import click

from dedn import __version__
from dedn.errors import DednInputError, DednOutputError
from dedn.outputs import STORAGE_ERRNOS

__all__ = ["cli", "main", "usage_line"]


def _usage_field(e: click.UsageError) -> str:
    """The option (``--population``), argument or part of the command line a click usage error is about."""
    if isinstance(e, click.BadParameter):
        if e.param is not None:
            opts = [o for o in e.param.opts if o.startswith("--")] or list(e.param.opts)
            if isinstance(e.param, click.Option) and opts:
                return max(opts, key=len)
            return e.param.human_readable_name
        if e.param_hint:
            hint = e.param_hint if isinstance(e.param_hint, str) else " / ".join(e.param_hint)
            return hint.strip("'\"")
        return "value"
    if isinstance(e, click.NoSuchOption | click.BadOptionUsage):
        return e.option_name
    if isinstance(e, click.BadArgumentUsage):
        return "argument"
    if e.message.startswith("No such command"):
        return "command"
    if e.message.startswith("Got unexpected extra argument"):
        return "arguments"
    return "usage"


def usage_line(e: click.UsageError, command: str = "dedn") -> str:
    """A click usage error as the one line bad input gets: ``<command>: <option>: <click's message>``
    (``command`` where click did not attach the context it was parsing)."""
    source = e.ctx.command_path if e.ctx is not None else command
    return str(DednInputError(source, _usage_field(e), e.format_message()))


class _Group(click.Group):
    """Turns bad input into one line on stderr and exit status 2, instead of a traceback; click's usage
    errors (unknown option, bad or missing value, stray argument) too, instead of its usage block.
    ``--help``, and a group called without a subcommand, still print their help."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            click.echo(f"error: {usage_line(e, ctx.command_path)}", err=True)
            ctx.exit(2)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DednInputError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except DednOutputError as e:  # a full disk, a quota, a read-only folder: the same one line, status 2
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except OSError as e:  # a storage failure no writer named: still one line, with the file if known
            if e.errno not in STORAGE_ERRNOS:
                raise
            click.echo(f"error: {DednOutputError(e.filename or 'an output', 'write', e)}", err=True)
            ctx.exit(2)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            sub = ctx.invoked_subcommand
            click.echo(f"error: {usage_line(e, ctx.command_path + (f' {sub}' if sub else ''))}", err=True)
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
