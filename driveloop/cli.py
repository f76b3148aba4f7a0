"""The ``driveloop`` command line. Each area registers its commands from its own ``_cli_*`` module;
this module only assembles them and turns errors into one line and an exit code.

| escapes a command | exit | why |
|---|---|---|
| ``DriveloopError`` | its ``exit_code`` | the error tree's own |
| ``OSError`` (a data directory that is a file, read-only, full) | 5 (as ``StorageError``) | the disk, not the command, is wrong |
| ``OverflowError`` (a number too large for a database or a C type) | 2 (as ``ConfigError``) | bad input |

``--debug`` shows the traceback instead.

Heavy imports (torch, ray, onnxruntime, flwr) happen inside commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import logging
import os
import sys

import click
import typer

from driveloop.core.exceptions import ConfigError, DriveloopError, StorageError

app = typer.Typer(
    name="driveloop",
    help="Edge autonomous-driving data closed loop: drive, record, learn, ship.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    """Import each area's CLI module; each adds its commands/sub-apps to ``app``."""
    for name in ("_cli_edge", "_cli_safety", "_cli_cloud", "_cli_pipeline", "_cli_fl", "_cli_ota", "_cli_ota_release", "_cli_compress", "_cli_demo", "_cli_fleet", "_cli_stream", "_cli_logs", "_cli_hazards", "_cli_shift"):
        try:
            __import__(f"driveloop.{name}")
        except ModuleNotFoundError as e:  # an area not built yet must not break the others
            if e.name != f"driveloop.{name}":
                raise


@app.callback()
def _root(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Info-level logs."),
) -> None:
    from driveloop.core.logsetup import configure_logging

    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    # JSON lines into <home>/logs/<command>.jsonl; driveloop's own lines at `level` on the terminal.
    configure_logging(ctx.invoked_subcommand or "driveloop", level, home=os.environ.get("DRIVELOOP_HOME", ".driveloop"),
                      file_level=logging.DEBUG if debug else logging.INFO)
    if debug:
        os.environ["DRIVELOOP_DEBUG"] = "1"


def _one_line(e: OSError | OverflowError) -> str:
    """``cannot write /x/y: Read-only file system`` rather than ``[Errno 30] …``; never a traceback."""
    if isinstance(e, OverflowError):
        return f"number out of range: {e}"
    what = f" {e.filename}" if e.filename is not None else ""
    text = f"cannot use{what}: {e.strerror or e}"
    if e.filename2 is not None:
        text += f" ({e.filename2})"
    return text.replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the CLI, prints errors as one line, returns the exit code."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    _register()
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=args, prog_name="driveloop", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.exceptions.Abort:
        print("driveloop: aborted", file=sys.stderr)
        code = 130
    except click.ClickException as e:  # bad flag, missing argument, bad value
        print(f"driveloop: error: {e.format_message()}", file=sys.stderr)
        code = e.exit_code
    except DriveloopError as e:
        if debug:
            raise
        print(f"driveloop: error: {e}", file=sys.stderr)
        code = e.exit_code
    except (OSError, OverflowError) as e:
        if debug:
            raise
        print(f"driveloop: error: {_one_line(e)}", file=sys.stderr)
        code = StorageError.exit_code if isinstance(e, OSError) else ConfigError.exit_code
    except KeyboardInterrupt:
        print("driveloop: interrupted", file=sys.stderr)
        code = 130
    finally:
        from driveloop.core.logsetup import reset_logging

        reset_logging()  # the next command in this process (tests) starts from the logging it found
    if argv is None:
        sys.exit(code)
    return code
