"""`fieldline schemas ...`: the wire contract's command line."""

import typer

app = typer.Typer(help="The wire contract: topics, message models and their JSON Schema files.", no_args_is_help=True)
