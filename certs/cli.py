"""`fieldline certs ...`: the PKI's command line."""

import typer

app = typer.Typer(help="Provision the PKI: CA, device/operator/service certificates, revocation.", no_args_is_help=True)
