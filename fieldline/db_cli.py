"""`fieldline db ...`: the database: embedded cluster, migrations, tenants."""

import typer

app = typer.Typer(help="The database: embedded PostgreSQL + TimescaleDB, migrations, tenants.", no_args_is_help=True)
