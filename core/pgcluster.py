"""An embedded PostgreSQL + TimescaleDB cluster under FIELDLINE_HOME/pg (local stack, tests)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import asyncpg

from core.errors import ClusterError
from core.settings import Settings, get_settings

log = logging.getLogger(__name__)

# sockaddr_un holds 108 bytes; the socket file adds "/.s.PGSQL.NNNNN"
_MAX_SOCKET_DIR = 90
_DEFAULT_BIN_DIRS = (Path("/usr/lib/postgresql/15/bin"),)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when a listener could bind host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # servers set SO_REUSEADDR too, so a port in TIME_WAIT counts as free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def find_bin_dir(explicit: Path | None = None) -> Path:
    """PostgreSQL's server binaries: explicit, then pg_config --bindir, then Debian's 15."""
    candidates: list[Path] = []
    if explicit is not None:
        candidates.append(explicit)
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0:
            candidates.append(Path(out.stdout.strip()))
    candidates.extend(_DEFAULT_BIN_DIRS)
    for cand in candidates:
        if (cand / "initdb").is_file() and (cand / "pg_ctl").is_file():
            return cand
    raise ClusterError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found; run `make setup` "
        "or set FIELDLINE_POSTGRES__BIN_DIR to PostgreSQL's bin directory"
    )


def timescaledb_installed(bin_dir: Path) -> bool:
    """True when the TimescaleDB extension is installed for this PostgreSQL."""
    pg_config = bin_dir / "pg_config"
    if not pg_config.is_file():
        found = shutil.which("pg_config")
        if found is None:
            return False
        pg_config = Path(found)
    out = subprocess.run(
        [str(pg_config), "--sharedir"], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        return False
    return (Path(out.stdout.strip()) / "extension" / "timescaledb.control").is_file()


@dataclass(frozen=True)
class _RunAs:
    user: str
    uid: int
    gid: int


class EmbeddedPostgres:
    """Create, start and stop a private PostgreSQL cluster; an async context manager.

    PostgreSQL refuses to run as root, so when we are root the server runs as an
    unprivileged account (``postgres`` by default) that owns the data directory.
    """

    def __init__(
        self,
        root: Path,
        *,
        port: int = 0,
        bin_dir: Path | None = None,
        database: str = "fieldline",
        user: str = "fieldline",
        run_as: str | None = None,
        durable: bool = True,
        extra_settings: dict[str, str] | None = None,
    ) -> None:
        self.root = root.absolute()
        self.database = database
        self.user = user
        self._wanted_port = port
        self._bin_dir_hint = bin_dir
        self._durable = durable
        self._extra = dict(extra_settings or {})
        self._run_as = self._resolve_run_as(run_as)

    # -- paths ---------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "log" / "postgres.log"

    @property
    def password_file(self) -> Path:
        return self.root / "password"

    @property
    def socket_dir(self) -> Path:
        """Where the unix socket lives (a short /tmp link when the real path is too long)."""
        real = self.root / "run"
        if len(str(real)) <= _MAX_SOCKET_DIR:
            return real
        link_file = self.root / "socket-dir"
        if link_file.is_file():
            recorded = Path(link_file.read_text().strip())
            if recorded.is_dir():
                return recorded
        short = Path(tempfile.mkdtemp(prefix="fl-pg-"))
        link_file.write_text(str(short))
        return short

    @property
    def bin_dir(self) -> Path:
        return find_bin_dir(self._bin_dir_hint)

    # -- state ---------------------------------------------------------------------------
    def initialized(self) -> bool:
        """True when initdb has run here."""
        return (self.data_dir / "PG_VERSION").is_file()

    def running(self) -> bool:
        """True when the postmaster of this data directory is alive."""
        if not self.initialized():
            return False
        proc = self._run(["pg_ctl", "status", "-D", str(self.data_dir)], check=False)
        return proc.returncode == 0

    @property
    def port(self) -> int:
        """The port the running server listens on (from postmaster.pid)."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
            return int(lines[3])
        except (OSError, IndexError, ValueError) as exc:
            raise ClusterError(
                f"the cluster in {self.root} is not running: start it with `fieldline db start`"
            ) from exc

    @property
    def password(self) -> str:
        try:
            return self.password_file.read_text().strip()
        except OSError as exc:
            raise ClusterError(
                f"no password file in {self.root}: the cluster was not created by fieldline; "
                "remove the directory or set FIELDLINE_DATABASE_URL"
            ) from exc

    def dsn(self, *, with_password: bool = True, database: str | None = None) -> str:
        """A libpq/asyncpg URL to the running cluster over loopback TCP."""
        secret = quote(self.password, safe="") if with_password else "***"
        db = database or self.database
        return f"postgresql://{self.user}:{secret}@127.0.0.1:{self.port}/{db}"

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self, timeout: float = 60.0) -> None:
        """Create the cluster if needed, start it and make sure the database exists."""
        await asyncio.to_thread(self._start_sync, timeout)
        await self._ensure_database()

    async def stop(self, timeout: float = 60.0) -> None:
        """Stop the server (fast shutdown: sessions are ended, then a checkpoint)."""
        await asyncio.to_thread(self._stop_sync, timeout)

    async def __aenter__(self) -> EmbeddedPostgres:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def init(self) -> None:
        """Run initdb with SCRAM authentication and a generated password (kept 0600)."""
        if self.initialized():
            return
        bin_dir = self.bin_dir
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700 if self._run_as is None else 0o711)
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise ClusterError(
                f"{self.data_dir} exists but holds no cluster; move it away, then retry"
            )
        self._check_traversable()
        password = secrets.token_urlsafe(24)
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(password + "\n")
        for sub in (self.data_dir, self.log_file.parent, self.root / "run"):
            sub.mkdir(parents=True, exist_ok=True)
            self._give(sub)
        # initdb reads the password from a file the server account can read; remove it afterwards
        pw_fd, pw_path = tempfile.mkstemp(prefix="fl-pw-")
        try:
            with os.fdopen(pw_fd, "w") as handle:
                handle.write(password + "\n")
            self._give(Path(pw_path))
            self._run(
                [
                    str(bin_dir / "initdb"),
                    "-D", str(self.data_dir),
                    "-U", self.user,
                    f"--pwfile={pw_path}",
                    "--auth-local=scram-sha-256",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    *([] if self._durable else ["--no-sync"]),
                ]
            )  # fmt: skip
        finally:
            os.unlink(pw_path)
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a") as handle:
            handle.write("\ninclude_if_exists = 'fieldline.conf'\n")
        log.info("created PostgreSQL cluster in %s", self.data_dir)

    # -- internals -----------------------------------------------------------------------
    def _write_conf(self, port: int) -> None:
        bin_dir = self.bin_dir
        settings: dict[str, str] = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "logging_collector": "off",
            "log_min_messages": "warning",
            "max_connections": "200",
        }
        if timescaledb_installed(bin_dir):
            settings["shared_preload_libraries"] = "'timescaledb'"
            settings["timescaledb.telemetry_level"] = "off"
        else:
            log.warning(
                "TimescaleDB is not installed for %s: tables will be plain, without "
                "hypertables; run `make setup` to build it",
                bin_dir,
            )
        if not self._durable:
            settings.update(
                {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
            )
        settings.update(self._extra)
        text = "".join(f"{key} = {value}\n" for key, value in settings.items())
        conf = self.data_dir / "fieldline.conf"
        conf.write_text(
            "# written by fieldline at every start; edit settings, not this file\n" + text
        )
        self._give(conf)

    def _choose_port(self) -> int:
        if self._wanted_port:
            if not port_is_free(self._wanted_port):
                raise ClusterError(
                    f"port {self._wanted_port} is in use; pick another with "
                    "FIELDLINE_POSTGRES__PORT or 0 for any free port"
                )
            return self._wanted_port
        last = self.root / "port"
        if last.is_file():
            with contextlib.suppress(ValueError):
                previous = int(last.read_text().strip())
                if port_is_free(previous):
                    return previous
        chosen = free_port()
        last.write_text(f"{chosen}\n")
        return chosen

    def _start_sync(self, timeout: float) -> None:
        self.init()
        if self.running():
            return
        # a postmaster.pid left by a killed server makes pg_ctl refuse to start
        port = self._choose_port()
        socket_dir = self.socket_dir
        socket_dir.mkdir(parents=True, exist_ok=True)
        self._give(socket_dir)
        self._write_conf(port)
        proc = self._run(
            [
                str(self.bin_dir / "pg_ctl"),
                "start",
                "-D", str(self.data_dir),
                "-l", str(self.log_file),
                "-w", "-t", str(int(timeout)),
            ],
            check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise ClusterError(
                f"PostgreSQL did not start in {self.data_dir}: {proc.stderr.strip()}\n"
                f"last log lines:\n{self._log_tail()}"
            )
        log.info("PostgreSQL started on 127.0.0.1:%d", port)

    def _stop_sync(self, timeout: float) -> None:
        if not self.running():
            return
        proc = self._run(
            [str(self.bin_dir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "fast",
             "-w", "-t", str(int(timeout))],
            check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise ClusterError(f"PostgreSQL did not stop: {proc.stderr.strip()}")

    async def _ensure_database(self) -> None:
        try:
            conn = await asyncpg.connect(self.dsn(database="postgres"), timeout=10)
        except (OSError, asyncpg.PostgresError) as exc:
            raise ClusterError(f"cannot connect to the embedded cluster: {exc}") from exc
        try:
            exists = await conn.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", self.database
            )
            if not exists:
                name = self.database.replace('"', '""')
                await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @staticmethod
    def _resolve_run_as(name: str | None) -> _RunAs | None:
        if os.geteuid() != 0:
            return None
        account = name or "postgres"
        try:
            entry = pwd.getpwnam(account)
        except KeyError as exc:
            raise ClusterError(
                f"running as root, and PostgreSQL refuses root: no '{account}' account to run "
                "it as; install postgresql (make setup) or run fieldline as a normal user"
            ) from exc
        return _RunAs(account, entry.pw_uid, entry.pw_gid)

    def _check_traversable(self) -> None:
        # the server account must be able to walk down to the data directory
        if self._run_as is None:
            return
        for parent in reversed(self.root.parents):
            mode = parent.stat()
            if mode.st_uid != self._run_as.uid and not mode.st_mode & 0o001:
                raise ClusterError(
                    f"PostgreSQL runs as '{self._run_as.user}', which cannot enter {parent} "
                    f"(mode {oct(mode.st_mode & 0o777)}); put FIELDLINE_HOME elsewhere or "
                    f"`chmod o+x {parent}`"
                )

    def _give(self, path: Path) -> None:
        if self._run_as is not None:
            os.chown(path, self._run_as.uid, self._run_as.gid)

    def _run(self, argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        if argv[0] == "pg_ctl":
            argv = [str(self.bin_dir / "pg_ctl"), *argv[1:]]
        run_as = self._run_as
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                check=False,
                env=env,
                cwd=self.root if self.root.exists() else None,
                user=run_as.uid if run_as else None,
                group=run_as.gid if run_as else None,
                extra_groups=[] if run_as else None,
            )
        except OSError as exc:
            raise ClusterError(f"cannot run {argv[0]}: {exc}") from exc
        if check and proc.returncode != 0:
            raise ClusterError(
                f"{Path(argv[0]).name} failed: {proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc


def cluster(settings: Settings | None = None) -> EmbeddedPostgres:
    """The embedded cluster under FIELDLINE_HOME/pg as the settings describe it."""
    s = settings or get_settings()
    return EmbeddedPostgres(
        s.pg_dir,
        port=s.postgres.port,
        bin_dir=s.postgres.bin_dir,
        database=s.postgres.database,
        user=s.postgres.user,
    )


def database_url(settings: Settings | None = None, tenant: str | None = None) -> str:
    """The tenant's own database if `tenant_databases` routes it, else FIELDLINE_DATABASE_URL,
    else the running embedded cluster's URL."""
    s = settings or get_settings()
    if tenant is not None and tenant in s.tenant_databases:
        return s.tenant_databases[tenant]
    if s.database_url:
        return s.database_url
    pg = cluster(s)
    if not pg.running():
        raise ClusterError(
            f"the embedded cluster in {pg.root} is not running: start it with "
            "`fieldline db start`, or set FIELDLINE_DATABASE_URL"
        )
    return pg.dsn()
