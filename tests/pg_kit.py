"""A real PostgreSQL server for the tests, from the ``pgserver`` wheel (the
server binaries ship inside it; the ``postgres`` extra installs it).

One server per test session (started on first use, stopped at exit), one
database per test. Two roles, neither a superuser: ``sv_owner`` owns each
test database and its tables (it migrates), ``sv_node`` is the node's role,
bound by row-level security. As root, pgserver runs the server as its own
system user (PostgreSQL refuses root), on a Unix socket only.
"""
from __future__ import annotations

import secrets
import shutil
import tempfile
import warnings
import pathlib

OWNER, NODE = "sv_owner", "sv_node"


class PgServer:
    """A server of its own; ``initdb_args`` and ``settings`` (postgresql.conf)
    for a test that needs another layout (tests/test_faults_disk_postgres.py
    puts the WAL on a small disk)."""

    def __init__(self, initdb_args: tuple[str, ...] = (), settings: dict[str, str] | None = None):
        import psycopg

        self._psycopg = psycopg
        # Under /tmp, not pytest's 0700 tmp folder: the server's own user must reach it.
        self.parent = pathlib.Path(tempfile.mkdtemp(prefix="splitvault-pg-"))
        self.parent.chmod(0o755)
        with warnings.catch_warnings():  # platformdirs: no XDG_RUNTIME_DIR here, falls back to /tmp
            warnings.simplefilter("ignore")
            import pgserver

            if initdb_args or settings:
                self._initdb(self.parent / "pgdata", initdb_args, settings or {})
            self.server = pgserver.get_server(self.parent / "pgdata", cleanup_mode="stop")
        self.socket_dir = self._socket_dir(self.server.get_uri())
        with self.admin() as c:
            for role in (OWNER, NODE):
                if not c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                    c.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS")

    @staticmethod
    def _initdb(pgdata: pathlib.Path, args: tuple[str, ...], settings: dict[str, str]) -> None:
        """As pgserver's own initdb (which it then skips), with more arguments and settings."""
        import os

        import pgserver
        from pgserver.utils import ensure_user_exists

        pgdata.mkdir(mode=0o700)
        user = None
        if os.geteuid() == 0:  # PostgreSQL refuses root: pgserver's own system user, as get_server does
            entry = ensure_user_exists("pgserver")
            user = entry.pw_name
            os.chown(pgdata, entry.pw_uid, entry.pw_gid)
        pgserver.initdb(["--auth=trust", "--auth-local=trust", "--encoding=utf8", "-U", "postgres", *args],
                        pgdata=pgdata, user=user)
        with open(pgdata / "postgresql.conf", "a") as conf:
            conf.writelines(f"{k} = {v}\n" for k, v in settings.items())

    @staticmethod
    def _socket_dir(uri: str) -> str:
        return uri.rsplit("host=", 1)[1].split("&", 1)[0]

    def uri(self, database: str = "postgres", role: str = "postgres") -> str:
        return f"postgresql://{role}@/{database}?host={self.socket_dir}"

    def admin(self):
        return self._psycopg.connect(self.uri(), autocommit=True)

    def new_database(self, prefix: str = "t", tablespace: str | None = None) -> str:
        name = f"{prefix}_{secrets.token_hex(6)}"
        with self.admin() as c:
            c.execute(f"CREATE DATABASE {name} OWNER {OWNER}" + (f" TABLESPACE {tablespace}" if tablespace else ""))
            c.execute(f"REVOKE ALL ON DATABASE {name} FROM PUBLIC")
            c.execute(f"GRANT CONNECT ON DATABASE {name} TO {NODE}")
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def location(self, database: str):
        from shareholders import storage

        return storage.Location("postgres", None, self.uri(database, NODE), self.uri(database, OWNER))

    def store_toml(self, database: str) -> str:
        """A node config's [store] section for ``database``."""
        return (f'[store]\nbackend = "postgres"\ndsn = "{self.uri(database, NODE)}"\n'
                f'owner_dsn = "{self.uri(database, OWNER)}"\n')

    def _pg_ctl(self, *args: str) -> None:
        import pgserver

        pgserver.pg_ctl(["-w", *args], pgdata=self.server.pgdata, user=self.server.system_user)

    def stop_server(self) -> None:
        """Stop the server (fast: open connections are cut), as a crash or a failover would."""
        self._pg_ctl("-m", "fast", "stop")

    def running(self) -> bool:
        """Whether the postmaster runs: the PID in postmaster.pid is a live
        process, as ``pg_ctl status`` decides (which once died of SIGSEGV here
        while the server was recovering, and so read as "stopped")."""
        try:
            pid = int((self.server.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
            state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            return False
        return state != "Z"

    def start_server(self) -> None:
        """Start it again on the same socket and data."""
        self._pg_ctl("-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.server.pgdata / "log"), "start")

    def close(self) -> None:
        try:
            self.server.cleanup()
        finally:
            shutil.rmtree(self.parent, ignore_errors=True)


_server: PgServer | None = None
_failure: str | None = None


def server() -> PgServer:
    """The session's server; raises RuntimeError (with the reason) if it cannot start here."""
    global _server, _failure
    if _server is None and _failure is None:
        try:
            _server = PgServer()
        except Exception as exc:  # noqa: BLE001 - reported as the skip reason
            _failure = f"{type(exc).__name__}: {exc}"
    if _server is None:
        raise RuntimeError(f"The PostgreSQL test server (pgserver) cannot start here: {_failure}")
    return _server


def stop() -> None:
    global _server
    if _server is not None:
        _server.close()
        _server = None



def ssl_bin_dir() -> pathlib.Path:
    """A folder of PostgreSQL binaries built with OpenSSL: pgserver's if they
    are (today's wheel is built without), else the machine's (pg_config on PATH);
    RuntimeError, saying so, if none is."""
    import subprocess

    from pgserver._commands import POSTGRES_BIN_PATH

    candidates = [POSTGRES_BIN_PATH]
    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10).stdout.strip()
        if bindir:
            candidates.append(pathlib.Path(bindir))
    for folder in candidates:
        try:
            configure = subprocess.run([str(folder / "pg_config"), "--configure"], capture_output=True, text=True,
                                       timeout=10).stdout
        except OSError:
            continue
        if ("--with-openssl" in configure or "--with-ssl=openssl" in configure) and (folder / "postgres").exists():
            return folder
    raise RuntimeError("No PostgreSQL binaries here are built with OpenSSL (pgserver's wheel is configured without "
                       "--with-openssl and no pg_config on PATH has it), so there is no TLS server to test against.")


class TlsPgServer(PgServer):
    """A server of its own as deploy/ expects an institution's: on 127.0.0.1
    over TLS only (``ssl_cert_file``, ``ssl_key_file``, ``ssl_ca_file``), and
    pg_hba.conf lets a TCP client in only by a client certificate from that CA
    whose CN names its role (``hostssl ... cert``): no password, no plain TCP.
    The tests' own superuser keeps the Unix socket. Binaries: ``ssl_bin_dir``."""

    def __init__(self, server_cert: bytes, server_key: bytes, client_ca: bytes):
        import os
        import socket
        import subprocess

        import psycopg

        self._psycopg = psycopg
        self.bin_dir = ssl_bin_dir()
        self.parent = pathlib.Path(tempfile.mkdtemp(prefix="splitvault-pgtls-"))
        self.parent.chmod(0o755)
        self.pgdata = self.parent / "pgdata"
        self.socket_dir = str(self.parent / "sock")
        self._user = None
        if os.geteuid() == 0:  # PostgreSQL refuses root: pgserver's own system user
            from pgserver.utils import ensure_user_exists

            self._user = ensure_user_exists("pgserver")
        for folder in (self.pgdata, self.parent / "sock"):
            folder.mkdir(mode=0o700)
            if self._user is not None:
                os.chown(folder, self._user.pw_uid, self._user.pw_gid)
        self._run("initdb", "-D", str(self.pgdata), "--auth=trust", "--auth-local=trust", "--encoding=utf8",
                  "-U", "postgres")
        tls = self.parent / "tls"
        tls.mkdir(mode=0o700)
        for name, data in (("server.crt", server_cert), ("server.key", server_key), ("ca.pem", client_ca)):
            (tls / name).write_bytes(data)
            (tls / name).chmod(0o600)
        for path in (tls, *tls.iterdir()):
            if self._user is not None:
                os.chown(path, self._user.pw_uid, self._user.pw_gid)
        (self.parent / "sock").chmod(0o755)  # the tests' own connections as root reach the socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        with open(self.pgdata / "postgresql.conf", "a") as conf:
            conf.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = "
                       f"'{self.socket_dir}'\nssl = on\nssl_cert_file = '{tls / 'server.crt'}'\n"
                       f"ssl_key_file = '{tls / 'server.key'}'\nssl_ca_file = '{tls / 'ca.pem'}'\nlog_connections = on\n")
        (self.pgdata / "pg_hba.conf").write_text("local all postgres trust\nhostssl all all 127.0.0.1/32 cert\n")
        try:
            self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-l", str(self.pgdata / "log"), "start")
        except subprocess.CalledProcessError as exc:
            log = (self.pgdata / "log").read_text() if (self.pgdata / "log").exists() else ""
            shutil.rmtree(self.parent, ignore_errors=True)
            raise RuntimeError(f"The TLS PostgreSQL server did not start: {log[-500:]}") from exc
        try:
            with self.admin() as c:
                for role in (OWNER, NODE):
                    c.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS")
        except BaseException:
            self.close()
            raise

    def _run(self, tool: str, *args: str) -> None:
        import subprocess

        # Files, not pipes: the server started by pg_ctl would hold a pipe open (as pgserver notes).
        with tempfile.TemporaryFile() as out:
            subprocess.run([str(self.bin_dir / tool), *args], check=True, stdout=out, stderr=out, timeout=60,
                           user=self._user.pw_uid if self._user else None,
                           group=self._user.pw_gid if self._user else None)

    def uri(self, database: str = "postgres", role: str = "postgres") -> str:
        """Over the Unix socket (the tests' own look at the server), on this server's port."""
        return f"{super().uri(database, role)}&port={self.port}"

    def log(self) -> str:
        return (self.pgdata / "log").read_text(errors="replace")

    def close(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-m", "fast", "stop")
        finally:
            shutil.rmtree(self.parent, ignore_errors=True)
