"""The ``fedsynth`` command: every role's sub-commands, the version and the log level."""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from rich.logging import RichHandler

from fedsynth.client.cli import client_command, train_local_command
from fedsynth.common import __version__
from fedsynth.common.cli import (
    config_command,
    evaluate_command,
    inspect_command,
    phantom_command,
    synthesize_command,
)
from fedsynth.server.cli import certs_command, keygen_command, server_command, status_command
from fedsynth.simulations.cli import simulate_command

app = typer.Typer(
    name="fedsynth",
    help="Federated cross-modality brain-image synthesis (Flower + Opacus + MONAI).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("inspect")(inspect_command)
app.command("phantom")(phantom_command)
app.command("config")(config_command)
app.command("train-local")(train_local_command)
app.command("synthesize")(synthesize_command)
app.command("evaluate")(evaluate_command)
app.command("server")(server_command)
app.command("client")(client_command)
app.command("certs")(certs_command)
app.command("keygen")(keygen_command)
app.command("status")(status_command)
app.command("simulate")(simulate_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedsynth {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose",
            "-v",
            count=True,
            help="-v: fedsynth's debug logs (the traceback behind a refused scan); -vv: every "
            "library's too.",
        ),
    ] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Federated cross-modality brain-image synthesis (Flower + Opacus + MONAI)."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(
        level=level,
        format="%(message)s",
        handlers=[RichHandler(show_path=verbose > 1, rich_tracebacks=True)],
        force=True,
    )
    if verbose == 1 and not quiet:
        logging.getLogger("fedsynth").setLevel(logging.DEBUG)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
