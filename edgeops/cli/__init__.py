"""The `edgeops` command line: click commands that parse, call the library, and print.

This is the only package that imports click, and the one boundary where typed errors
become a one-line message and an exit code (see edgeops.errors):
  0 ok · 1 verification/budget failed · 2 usage or input error · 3 environment
  70 internal error (a bug: please report it; --debug shows the traceback)
Results go to stdout (a rich table, or JSON with --json); progress and errors go to stderr.
Start-up imports no ML framework.
"""

from __future__ import annotations

import sqlite3
import sys

import click

from .. import __version__
from ..errors import EdgeopsError, first_line

EXIT_INTERNAL = 70


class EdgeopsGroup(click.Group):
    """Maps library errors to messages and exit codes in one place."""

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except EdgeopsError as exc:
            if debug:
                raise
            _fail(f"error: {exc.message}", exc.hint, exc.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except sqlite3.DatabaseError as exc:   # a registry.db damaged on disk
            if debug:
                raise
            _fail(f"error: the registry database is damaged: {first_line(exc)}",
                  "restore $EDGEOPS_HOME/registry.db from a backup (or point EDGEOPS_REGISTRY_URL elsewhere)",
                  2)
        except KeyboardInterrupt:
            _fail("interrupted", None, 130)
        except Exception as exc:  # a bug in edgeops or an unexpected framework failure
            if debug:
                raise
            _fail(f"internal error: {type(exc).__name__}: {first_line(exc)}",
                  "run again with --debug for the traceback, and please report it",
                  EXIT_INTERNAL)


def _fail(message: str, hint: str | None, code: int) -> None:
    from rich.console import Console

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    err.print(f"[bold red]{_esc(message)}[/]")
    if hint:
        err.print(f"  hint: {_esc(hint)}")
    sys.exit(code)


def _esc(text: str) -> str:
    from rich.markup import escape

    return escape(text)


@click.group(cls=EdgeopsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(__version__, prog_name="edgeops")
def cli(debug: bool) -> None:
    """edgeops: convert, verify and ship ML models to edge devices.

    Exit codes: 0 ok, 1 verification failed or a budget not met, 2 usage or input error,
    3 environment (missing extra, unreachable or unready device), 70 internal error.
    """


def main() -> None:
    # click itself exits 2 on a usage error, matching EXIT_INPUT
    cli.main(prog_name="edgeops")


from . import bench, bundle, commands, deploy, optimize, registry, rollout, telemetry  # noqa: E402,F401  (registers the commands on `cli`)
