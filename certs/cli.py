"""`fieldline certs ...`: provision and revoke the certificates every client logs in with."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import typer
from rich.table import Table

from certs.authority import Pki
from certs.crl import expired_line, format_left
from certs.errors import PassphraseError
from certs.model import CLIENT_ROLES, KeyType, Role
from core.console import cli_console
from core.settings import get_settings

app = typer.Typer(
    help="Provision the PKI under FIELDLINE_HOME/pki: a CA, one certificate per device, "
    "operator, service or admin (CN = id, O = tenant, OU = role), broker certificates, "
    "revocation. Keys are written 0600 and never printed.",
    no_args_is_help=True,
)
console = cli_console()
err_console = cli_console(stderr=True)

_CA_KEY_ENV_HELP = (
    "Name of an environment variable holding the CA key's passphrase "
    "(never the passphrase itself, so it stays out of shell history and `ps`)."
)


def _pki() -> Pki:
    settings = get_settings()
    return Pki(settings.pki_dir, crl_validity_days=settings.certs.crl_validity_days)


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


crl_app = typer.Typer(
    help="The certificate revocation list. Both brokers refuse EVERY client once it is past its "
    "next update (default 30 days after it was written): `fieldline certs crl` shows how long "
    "it has left and exits non-zero when it is expired (2) or expires within --within days (1), "
    "so it serves as a check; `fieldline certs crl renew` signs a new one.",
)
app.add_typer(crl_app, name="crl")

_WITHIN_HELP = "Exit 1 when the CRL expires within this many days (expired: exit 2)."
_FILE_HELP = (
    "Check this CRL file instead of FIELDLINE_HOME/pki/crl.pem, e.g. the copy Mosquitto reads "
    "(/etc/fieldline/mosquitto/certs/crl.pem); its signature is checked against the CA."
)


@crl_app.callback(invoke_without_command=True)
def crl(
    ctx: typer.Context,
    within: float = typer.Option(7.0, "--within", min=0, help=_WITHIN_HELP),
    file: Path | None = typer.Option(None, "--file", help=_FILE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show the CRL (same as `crl show`); `crl renew` writes a new one."""
    if ctx.invoked_subcommand is None:
        _show_crl(within, file, as_json)


@crl_app.command("show")
def crl_show(
    within: float = typer.Option(7.0, "--within", min=0, help=_WITHIN_HELP),
    file: Path | None = typer.Option(None, "--file", help=_FILE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Issuer, this and next update, revoked count, time left. Exit 0 current, 1 expiring
    within --within days, 2 expired (or unreadable): usable as a monitoring check."""
    _show_crl(within, file, as_json)


@crl_app.command("renew")
def crl_renew(
    days: float | None = typer.Option(
        None,
        "--days",
        help="Days until the new CRL's next update, fractions allowed "
        "(default: the setting certs.crl_validity_days, 30).",
    ),
    if_due: bool = typer.Option(
        False,
        "--if-due",
        help="Only when a third of its validity remains (for a timer); otherwise do nothing.",
    ),
    ca_passphrase_env: str | None = typer.Option(
        None, "--ca-passphrase-env", help=_CA_KEY_ENV_HELP
    ),
) -> None:
    """Sign a new CRL with every revoked serial. The embedded broker picks it up by itself;
    Mosquitto reads a copy: re-render (`fieldline broker mosquitto-config`) and SIGHUP it."""
    pki = _pki()
    if if_due:
        current = pki.crl_status()
        if not current.renewal_due():
            start = current.renew_from()
            when = f"{start:%Y-%m-%d %H:%M:%S} UTC" if start else "never (no next update)"
            console.print(f"CRL current until {_when(current.next_update)}; renewal due {when}")
            return
    status = pki.renew_crl(days=days, ca_passphrase=_from_env(ca_passphrase_env))
    console.print(
        f"CRL renewed: {status.path}, next update {_when(status.next_update)}, "
        f"{status.revoked} revoked",
        highlight=False,
        soft_wrap=True,
    )


def _when(moment: datetime | None) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC" if moment else "never"


def _show_crl(within: float, file: Path | None, as_json: bool) -> None:
    pki = _pki()
    status = pki.crl_status(file)
    now = datetime.now(UTC)
    left = status.time_left(now)
    if status.expired(now):
        code, state = 2, "EXPIRED: both brokers refuse every client"
    elif left is not None and left <= timedelta(days=within):
        code, state = 1, f"expires within {within:g} days"
    elif status.renewal_due(now):
        code, state = 0, "current, renewal due"
    else:
        code, state = 0, "current"
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "file": str(status.path),
                    "issuer": status.issuer,
                    "this_update": status.this_update.isoformat(),
                    "next_update": status.next_update.isoformat() if status.next_update else None,
                    "revoked": status.revoked,
                    "seconds_left": left.total_seconds() if left is not None else None,
                    "renewal_due": status.renewal_due(now),
                    "state": state,
                },
                indent=2,
            )
        )
    else:
        renew_from = status.renew_from()
        rows = [
            ("file", str(status.path)),
            ("issuer", status.issuer),
            ("this update", _when(status.this_update)),
            ("next update", _when(status.next_update)),
            ("revoked", f"{status.revoked} certificate(s)"),
            ("time left", format_left(left) if left is not None else "unlimited"),
            ("renew from", _when(renew_from) if renew_from else "never"),
            ("status", state),
        ]
        for key, value in rows:
            console.print(f"{key:12} {value}", highlight=False, soft_wrap=True)
    if code == 2:
        # the same line the embedded broker logs, for the journal of whoever runs the check
        err_console.print(
            expired_line(status.path, status.next_update),
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
    if code:
        raise typer.Exit(code)


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
