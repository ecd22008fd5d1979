"""`fieldline certs ...`: provision and revoke the certificates every client logs in with."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from certs.authority import Pki
from certs.errors import PassphraseError
from certs.model import CLIENT_ROLES, KeyType, Role
from fieldline.settings import get_settings

app = typer.Typer(
    help="Provision the PKI under FIELDLINE_HOME/pki: a CA, one certificate per device, "
    "operator, service or admin (CN = id, O = tenant, OU = role), broker certificates, "
    "revocation. Keys are written 0600 and never printed.",
    no_args_is_help=True,
)
console = Console()

_CA_KEY_ENV_HELP = (
    "Name of an environment variable holding the CA key's passphrase "
    "(never the passphrase itself, so it stays out of shell history and `ps`)."
)


def _pki() -> Pki:
    return Pki(get_settings().pki_dir)


def _from_env(var: str | None) -> str | None:
    if var is None:
        return None
    value = os.environ.get(var)
    if not value:
        raise PassphraseError(f"environment variable {var} is not set or empty")
    return value


@app.command("init-ca")
def init_ca(
    name: str = typer.Option("fieldline CA", "--name", help="The CA's common name."),
    key_type: KeyType = typer.Option(KeyType.EC_P256, "--key-type", help="Key algorithm."),
    passphrase_env: str | None = typer.Option(
        None, "--passphrase-env", help="Encrypt the CA key; " + _CA_KEY_ENV_HELP
    ),
    passphrase_prompt: bool = typer.Option(
        False, "--passphrase-prompt", help="Encrypt the CA key with a passphrase typed now."
    ),
    days: int = typer.Option(3650, "--days", min=1, help="Validity of the CA certificate."),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing CA (everything it issued stops working)."
    ),
) -> None:
    """Create the certificate authority and an empty revocation list."""
    passphrase = _from_env(passphrase_env)
    if passphrase_prompt:
        passphrase = typer.prompt("CA passphrase", hide_input=True, confirmation_prompt=True)
    pki = _pki()
    path = pki.init_ca(name=name, key_type=key_type, passphrase=passphrase, days=days, force=force)
    console.print(f"CA created: {path}")
    console.print(f"CRL: {pki.crl_path}")
    if passphrase:
        console.print("the CA key is encrypted: pass --ca-passphrase-env when issuing")


@app.command()
def issue(
    identity_id: str = typer.Argument(..., metavar="ID", help="The client id (certificate CN)."),
    tenant: str = typer.Option(..., "--tenant", help="The tenant (certificate O)."),
    role: Role = typer.Option(
        ..., "--role", help="device, operator, service or admin (certificate OU)."
    ),
    days: int = typer.Option(365, "--days", min=1, help="Validity in days."),
    force: bool = typer.Option(
        False, "--force", help="Re-issue an existing id; its old certificate is revoked."
    ),
    ca_passphrase_env: str | None = typer.Option(
        None, "--ca-passphrase-env", help=_CA_KEY_ENV_HELP
    ),
) -> None:
    """Issue a client certificate and write its bundle (PEM and DER cert, key and CA)."""
    if role not in CLIENT_ROLES:
        raise typer.BadParameter(
            "use `fieldline certs server` for broker certificates", param_hint="--role"
        )
    pki = _pki()
    bundle = pki.issue(
        identity_id,
        tenant=tenant,
        role=role,
        days=days,
        force=force,
        ca_passphrase=_from_env(ca_passphrase_env),
    )
    console.print(
        f"issued {role.value} [bold]{identity_id}[/bold] of tenant {tenant}, "
        f"serial {bundle.serial:x}, valid until {bundle.not_after:%Y-%m-%d}",
        soft_wrap=True,
    )
    _print_bundle(bundle.directory)
    if force:
        console.print("any earlier certificate of this id is revoked; the CRL was rewritten")
    settings = get_settings()
    if role is Role.OPERATOR:
        console.print("watch the tenant's traffic:")
        typer.echo(
            f"mosquitto_sub -h {settings.broker.host} -p {settings.broker.port} -i {identity_id} "
            f"--cafile {bundle.ca} --cert {bundle.cert} --key {bundle.key} "
            f"-t 'fl/{tenant}/#' -v"
        )


@app.command()
def server(
    name: str = typer.Argument("broker", help="Name of the server certificate."),
    host: list[str] = typer.Option(
        ["localhost"], "--host", help="DNS name clients connect to (repeatable)."
    ),
    ip: list[str] = typer.Option(
        ["127.0.0.1"], "--ip", help="IP address clients connect to (repeatable)."
    ),
    days: int = typer.Option(825, "--days", min=1, help="Validity in days."),
    force: bool = typer.Option(False, "--force", help="Replace an existing server certificate."),
    ca_passphrase_env: str | None = typer.Option(
        None, "--ca-passphrase-env", help=_CA_KEY_ENV_HELP
    ),
) -> None:
    """Issue a broker (TLS server) certificate with DNS and IP subject alternative names."""
    bundle = _pki().issue_server(
        name, hosts=host, ips=ip, days=days, force=force, ca_passphrase=_from_env(ca_passphrase_env)
    )
    console.print(f"server certificate {name} for {', '.join([*host, *ip])}")
    _print_bundle(bundle.directory)


@app.command()
def revoke(
    id_or_serial: str = typer.Argument(
        ..., metavar="ID_OR_SERIAL", help="An id (its current certificate) or a serial (hex)."
    ),
    reason: str = typer.Option("unspecified", "--reason", help="Why, for the registry."),
    ca_passphrase_env: str | None = typer.Option(
        None, "--ca-passphrase-env", help=_CA_KEY_ENV_HELP
    ),
) -> None:
    """Revoke a certificate and rewrite the CRL (then SIGHUP Mosquitto, or wait for the broker)."""
    pki = _pki()
    record = pki.revoke(id_or_serial, reason=reason, ca_passphrase=_from_env(ca_passphrase_env))
    console.print(f"revoked {record.id} (serial {record.serial_hex}); CRL: {pki.crl_path}")


@app.command()
def crl(
    days: int = typer.Option(30, "--days", min=1, help="Days until the CRL's next update."),
    ca_passphrase_env: str | None = typer.Option(
        None, "--ca-passphrase-env", help=_CA_KEY_ENV_HELP
    ),
) -> None:
    """Regenerate the CRL (do this before it expires: brokers refuse clients on a stale CRL)."""
    path = _pki().write_crl(days=days, ca_passphrase=_from_env(ca_passphrase_env))
    console.print(f"CRL written: {path}")


@app.command("list")
def list_(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Every certificate issued, revoked ones included."""
    records = _pki().records()
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {
                        "id": r.id,
                        "tenant": r.tenant,
                        "role": r.role.value,
                        "serial": r.serial_hex,
                        "not_after": r.not_after.isoformat(),
                        "revoked": r.revoked_at is not None,
                    }
                    for r in records
                ],
                indent=2,
            )
        )
        return
    table = Table("id", "tenant", "role", "serial", "not after", "revoked")
    for r in records:
        revoked = f"{r.revoked_at:%Y-%m-%d}" if r.revoked_at else ""
        table.add_row(
            r.id, r.tenant, r.role.value, r.serial_hex[:12], f"{r.not_after:%Y-%m-%d}", revoked
        )
    console.print(table)


@app.command()
def verify(
    file: Path = typer.Argument(..., help="A certificate, PEM or DER."),
) -> None:
    """Check a certificate against this CA: signature, validity window, revocation, identity."""
    result = _pki().verify(file)
    who = (
        f"{result.identity.role.value} {result.identity.id} of tenant {result.identity.tenant}"
        if result.identity
        else "no identity"
    )
    if result.ok:
        console.print(f"[green]OK[/green] {who}, serial {result.serial:x}")
        return
    console.print(f"[red]INVALID[/red] {who}: {'; '.join(result.problems)}")
    raise typer.Exit(1)


@app.command()
def show(identity_id: str = typer.Argument(..., metavar="ID", help="The client id.")) -> None:
    """The files of an id's current bundle."""
    _print_bundle(_pki().bundle(identity_id).directory)


def _print_bundle(directory: Path) -> None:
    for name in ("cert.pem", "key.pem", "ca.pem", "cert.der", "key.der", "ca.der"):
        console.print(f"  {name:9} {directory / name}", highlight=False)
