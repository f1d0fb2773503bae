"""Entry point: the command group, error reporting and exit codes.

Every refusal is one line on stderr, ``unbrick: error: WHAT; WHAT TO DO``, with the exit code
of its error class (``docs/exit-codes.md``).
"""

from __future__ import annotations

import sys

import click

from unbrick import __version__
from unbrick.cli.diagnose import diagnose
from unbrick.cli.image import image
from unbrick.cli.nmrp import nmrp
from unbrick.cli.sim import sim
from unbrick.cli.tftp import tftp
from unbrick.cli.workbench import COMMANDS
from unbrick.errors import InternalError, UnbrickError, UsageError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="unbrick")
def cli() -> None:
    """unbrick: diagnose, back up, flash and verify firmware on devices."""


cli.add_command(image)
cli.add_command(sim)
cli.add_command(diagnose)
cli.add_command(nmrp)
cli.add_command(tftp)
for _command in COMMANDS:
    cli.add_command(_command)


def _fail(err: UnbrickError) -> int:
    click.echo(f"unbrick: error: {err.one_line()}", err=True)
    return err.exit_code


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return (or exit with) its status."""
    try:
        rv = cli.main(args=argv, prog_name="unbrick", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else "", err=True)
        return UsageError.exit_code
    except click.UsageError as e:
        where = f" ({e.ctx.command_path})" if e.ctx else ""
        return _fail(UsageError(f"{e.format_message()}{where}"))
    except click.exceptions.Exit as e:
        return int(e.exit_code)
    except click.Abort:
        click.echo("unbrick: aborted", err=True)
        return 130
    except SystemExit as e:  # raised by commands that decide their own status
        return int(e.code) if isinstance(e.code, int) else 0
    except UnbrickError as e:
        return _fail(e)
    except KeyboardInterrupt:
        click.echo("unbrick: interrupted", err=True)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:
        return _fail(InternalError(f"unexpected {type(e).__name__}: {e}"))
    return rv if isinstance(rv, int) else 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
