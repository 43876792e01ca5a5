"""The `minifd` command line: run, and the tools around it."""

import sys

import click

from minifd.errors import MinifdError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show a full traceback on errors.")
@click.pass_context
def main_group(ctx, debug):
    """minifd: a small, readable FlashDecoding++ inference engine for Llama-family models."""
    ctx.obj = {"debug": debug}


# Subcommands register here, one line each.


def main(argv=None):
    """Entry point: user errors print one line on stderr and exit 2, never a traceback."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        main_group.main(args=argv, prog_name="minifd", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("minifd: aborted", err=True)
        sys.exit(130)
    except click.ClickException as error:
        click.echo(f"minifd: {error.format_message()}", err=True)
        sys.exit(2)
    except MinifdError as error:
        if debug:
            raise
        click.echo(f"minifd: error: {error}", err=True)
        sys.exit(2)
