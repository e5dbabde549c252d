"""Throwaway MariaDB (and MySQL 8+) instances for tests, the demo and benchmarks.

Each instance gets its own temporary datadir, a free loopback port and a unix
socket, and is stopped by pid.  It never touches a server that may already run
on 3306.  The primary is configured the way the migrator needs it (ROW binlog,
FULL image, FULL row metadata, GTIDs); a replica replicates from it by GTID.

:class:`Sandbox` runs MariaDB; :class:`MysqlSandbox` runs MySQL 8+ the same
way (GTID mode on), from a server found or fetched by :mod:`proxy.mysqldist`.

Blocking code on purpose: it runs before trio starts (pytest session fixtures,
the ``demo`` command, benchmarks).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pymysql

if TYPE_CHECKING:
    from proxy.mysqldist import MysqlDist

SERVER_BINARIES = ("mariadbd", "mariadb-install-db")
SEARCH_PATH = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")

PRIMARY_OPTIONS = (
    "--log-bin=mariadb-bin",
    "--binlog-format=ROW",
    "--binlog-row-image=FULL",
    "--binlog-row-metadata=FULL",
    "--log-slave-updates=1",
    "--gtid-strict-mode=1",
)

#: the same for MySQL 8+: GTID mode instead of MariaDB's domain GTIDs.  Replica
#: updates are logged by default (log_replica_updates=ON).
MYSQL_PRIMARY_OPTIONS = (
    "--log-bin=mysql-bin",
    "--relay-log=relay-bin",
    "--gtid-mode=ON",
    "--enforce-gtid-consistency=ON",
    "--binlog-format=ROW",
    "--binlog-row-image=FULL",
    "--binlog-row-metadata=FULL",
)


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tidegate test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.pem", directory / "server-key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


#: server options both sandboxes use (MariaDB and MySQL)
SERVER_OPTIONS: tuple[str, ...] = (
    "--innodb-buffer-pool-size=256M",
    "--innodb-flush-log-at-trx-commit=2",
    "--sync-binlog=0",
    "--max-connections=1000",
    "--max-allowed-packet=256M",
    "--local-infile=1",
    "--performance-schema=ON",
    "--lock-wait-timeout=60",
)


class SandboxError(RuntimeError):
    """The throwaway server could not be installed, started or stopped."""


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in SEARCH_PATH:
        candidate = Path(directory) / name
        if candidate.exists():
            return str(candidate)
    return None


def ensure_installed() -> None:
    """Make sure mariadbd is there; install it with apt when we are root."""
    if all(find_binary(name) for name in SERVER_BINARIES):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "mariadb-server", "mariadb-client"],
            check=True,
            env=env,
        )
        # The Debian package starts a service on 3306; we leave it alone.
        if all(find_binary(name) for name in SERVER_BINARIES):
            return
    raise SandboxError(
        "mariadbd / mariadb-install-db not found. Install MariaDB 10.11+: "
        "`apt-get install -y mariadb-server` (Debian/Ubuntu) and run again."
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Instance:
    """One running mariadbd (or MySQL mysqld)."""

    name: str
    port: int
    directory: Path
    server_id: int
    process: subprocess.Popen[bytes] | None = None
    role: str = "primary"
    user: str = "root"
    password: str = "root"
    #: "mariadb" or "mysql"
    flavor: str = "mariadb"

    @property
    def datadir(self) -> Path:
        return self.directory / "data"

    @property
    def socket_path(self) -> str:
        return str(self.directory / "mysqld.sock")

    @property
    def log_path(self) -> Path:
        return self.directory / "error.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def dsn(self, database: str = "", user: str | None = None, password: str | None = None) -> str:
        user = user or self.user
        password = self.password if password is None else password
        return f"mysql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def connect(self, **kwargs: Any) -> pymysql.connections.Connection[Any]:
        options: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "autocommit": True,
            "charset": "utf8mb4",
            "connect_timeout": 5,
        }
        options.update(kwargs)
        return pymysql.connect(**options)

    def execute(self, *statements: str) -> list[tuple[Any, ...]]:
        """Run statements on a fresh connection; return the last result's rows."""
        connection = self.connect()
        try:
            rows: list[tuple[Any, ...]] = []
            with connection.cursor() as cursor:
                for statement in statements:
                    cursor.execute(statement)
                    rows = list(cursor.fetchall())
            return rows
        finally:
            connection.close()

    def tail_log(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no error log)"

    def stop(self, timeout: float = 30.0) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is not None and process.returncode != 0:
            # It died on its own (a server crash): keep its log, the directory is about to go.
            kept = Path(tempfile.gettempdir()) / f"tidegate-crash-{self.name}-{process.pid}.log"
            with contextlib.suppress(OSError):
                shutil.copyfile(self.log_path, kept)
            print(f"sandbox: {self.name} (pid {process.pid}) had exited with code {process.returncode}; "
                  f"its error log is kept in {kept}; last lines:\n{self.tail_log(40)}", file=sys.stderr)
        if process.poll() is None:
            if self.flavor == "mysql":
                self._kill_binlog_dumps()
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self.process = None

    def _kill_binlog_dumps(self) -> None:
        """End MySQL's binlog dump threads before a shutdown.

        A dump thread whose reader (a replica, a binlog stream) has gone keeps
        waiting for new events, and holds a SIGTERM shutdown up for ~10 s.
        """
        with contextlib.suppress(Exception):
            connection = pymysql.connect(
                unix_socket=self.socket_path, user="root", password="", connect_timeout=2
            )
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SHOW PROCESSLIST")
                    for row in cursor.fetchall():
                        if str(row[4]).startswith("Binlog Dump"):
                            with contextlib.suppress(pymysql.err.MySQLError):
                                cursor.execute(f"KILL {int(row[0])}")
            finally:
                connection.close()

    def kill(self) -> None:
        """SIGKILL, for crash tests."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None


@dataclass
class Sandbox:
    """A directory holding one primary and optional replicas."""

    flavor: ClassVar[str] = "mariadb"
    server_name: ClassVar[str] = "mariadbd"

    base: Path | None = None
    instances: list[Instance] = field(default_factory=list)
    keep: bool = False
    _owns_base: bool = False
    _template: Path | None = None
    #: (CA, server certificate, server key) for instances started with tls=True
    certificates: tuple[Path, Path, Path] | None = None
    #: options for every instance, after all others (the last of a repeated option wins),
    #: e.g. the migration benchmark's ``--innodb-buffer-pool-size``
    server_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.base is None:
            self.base = Path(tempfile.mkdtemp(prefix="tidegate-db-"))
            self._owns_base = True
        self.base.mkdir(parents=True, exist_ok=True)

    def _tls_options(self, tls: bool, off: tuple[str, ...] = ()) -> tuple[str, ...]:
        """TLS is opt-in: pymysql prefers TLS whenever a server offers it, which
        would tax every direct connection in tests and benchmarks."""
        if not tls:
            return off
        ca, certificate, key = self.tls_files()
        return (f"--ssl-ca={ca}", f"--ssl-cert={certificate}", f"--ssl-key={key}")

    def tls_files(self) -> tuple[Path, Path, Path]:
        """(CA, certificate, key) for localhost, made once per sandbox."""
        if self.certificates is None:
            assert self.base is not None
            self.certificates = make_certificates(self.base / "tls")
        return self.certificates

    # -- lifecycle -------------------------------------------------------

    def _initialized_template(self) -> Path:
        """mariadb-install-db once per sandbox; instances copy the result."""
        if self._template is not None:
            return self._template
        assert self.base is not None
        template = self.base / "template"
        if template.exists():
            shutil.rmtree(template)
        command = [
            find_binary("mariadb-install-db") or "mariadb-install-db",
            "--no-defaults",
            f"--datadir={template}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ]
        if os.geteuid() == 0:
            command.append("--user=root")
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SandboxError(f"mariadb-install-db failed:\n{result.stdout}\n{result.stderr}")
        self._template = template
        return template

    def _spawn(
        self, name: str, server_id: int, options: tuple[str, ...], role: str, tls: bool = False
    ) -> Instance:
        # free_port() releases the port before mariadbd binds it; another
        # process may take it in between, so a start that dies is retried.
        for attempt in range(3):
            try:
                return self._spawn_once(name, server_id, options, role, tls)
            except SandboxError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _spawn_once(
        self, name: str, server_id: int, options: tuple[str, ...], role: str, tls: bool
    ) -> Instance:
        assert self.base is not None
        running = [i for i in self.instances if i.name == name and i.process is not None and i.process.poll() is None]
        if running:
            # its directory would be deleted under it (and the rmtree race its writes)
            raise SandboxError(f"an instance named {name!r} is already running (pid {running[0].pid}); "
                               "give the new one another name")
        directory = self.base / name
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        shutil.copytree(self._initialized_template(), directory / "data")
        (directory / "tmp").mkdir()
        instance = Instance(name, free_port(), directory, server_id, role=role, flavor=self.flavor)
        command = self._server_command(instance, options, tls)
        log = open(directory / "stdout.log", "wb")
        instance.process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=self._server_environment(),
        )
        log.close()
        self._wait_ready(instance)
        self.instances.append(instance)
        return instance

    def _server_environment(self) -> dict[str, str] | None:
        return None

    def _instance_options(self, instance: Instance) -> tuple[str, ...]:
        """Where this instance keeps its files and listens: the same for both servers."""
        directory = instance.directory
        return (
            f"--datadir={instance.datadir}",
            # its own temporary files: nothing shared with other servers in /tmp
            f"--tmpdir={directory / 'tmp'}",
            f"--port={instance.port}",
            "--bind-address=127.0.0.1",
            f"--socket={instance.socket_path}",
            f"--pid-file={directory / f'{self.server_name}.pid'}",
            f"--log-error={instance.log_path}",
            f"--server-id={instance.server_id}",
            "--skip-name-resolve",
            "--character-set-server=utf8mb4",
        )

    def _server_command(self, instance: Instance, options: tuple[str, ...], tls: bool) -> list[str]:
        command = [
            find_binary("mariadbd") or "mariadbd",
            "--no-defaults",
            *self._instance_options(instance),
            "--collation-server=utf8mb4_general_ci",
            "--innodb-log-file-size=256M",
            *SERVER_OPTIONS,
            *self._tls_options(tls),
            *options,
            *self.server_options,
        ]
        if os.geteuid() == 0:
            command.append("--user=root")
        return command

    def _wait_ready(self, instance: Instance, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if instance.process is not None and instance.process.poll() is not None:
                raise SandboxError(
                    f"{self.server_name} {instance.name} exited with {instance.process.returncode}:\n"
                    f"{instance.tail_log()}"
                )
            try:
                connection = pymysql.connect(
                    unix_socket=instance.socket_path, user="root", password="", connect_timeout=2
                )
            except pymysql.err.OperationalError as error:
                last_error = error
                time.sleep(0.1)
                continue
            try:
                with connection.cursor() as cursor:
                    # One root account for TCP use ('root'/'root'); root@localhost keeps
                    # an empty password on the socket.  Host-specific and anonymous
                    # accounts would shadow 'root'@'%' for 127.0.0.1, so they go.
                    # Not binlogged: every instance sets itself up the same way,
                    # and a replica's binlog must start empty for GTID replication.
                    cursor.execute("SET SESSION sql_log_bin = 0")
                    cursor.execute(
                        "SELECT User, Host FROM mysql.user WHERE User = '' "
                        "OR (User = 'root' AND Host NOT IN ('localhost', '%'))"
                    )
                    for user, host in cursor.fetchall():
                        cursor.execute(f"DROP USER '{user}'@'{host}'")
                    cursor.execute("CREATE USER IF NOT EXISTS 'root'@'%' IDENTIFIED BY 'root'")
                    cursor.execute("GRANT ALL ON *.* TO 'root'@'%' WITH GRANT OPTION")
                    cursor.execute("CREATE USER IF NOT EXISTS 'repl'@'%' IDENTIFIED BY 'repl'")
                    cursor.execute(
                        "GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO 'repl'@'%'"
                    )
            finally:
                connection.close()
            return
        instance.kill()  # never leak a server that did not come up
        raise SandboxError(
            f"{self.server_name} {instance.name} not ready after {timeout:.0f}s ({last_error}):\n"
            f"{instance.tail_log()}"
        )

    def start_primary(self, name: str = "primary", server_id: int = 1, *, tls: bool = False) -> Instance:
        return self._spawn(name, server_id, PRIMARY_OPTIONS, "primary", tls)

    def start_replica(self, primary: Instance, name: str = "replica", server_id: int = 2) -> Instance:
        replica = self._spawn(name, server_id, (*PRIMARY_OPTIONS, "--read-only=1"), "replica")
        # Replicate from the very start of the primary's binlog so users and
        # schemas created before the replica existed arrive too.
        replica.execute(
            "SET GLOBAL gtid_slave_pos = ''",
            f"CHANGE MASTER TO master_host='127.0.0.1', master_port={primary.port}, "
            "master_user='repl', master_password='repl', master_use_gtid=slave_pos, "
            "master_connect_retry=1",
            "START SLAVE",
        )
        wait_replica_caught_up(primary, replica)
        return replica

    def stop(self) -> None:
        for instance in reversed(self.instances):
            with contextlib.suppress(Exception):
                instance.stop()
        self.instances.clear()
        if self._owns_base and not self.keep and self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass
class MysqlSandbox(Sandbox):
    """The same sandbox running MySQL 8+ (GTID mode on, caching_sha2_password accounts).

    ``dist`` is found or fetched by :func:`proxy.mysqldist.ensure_mysql` on the
    first start when not given.  Replicas need MySQL 8.0.23+ (``CHANGE
    REPLICATION SOURCE``).
    """

    flavor: ClassVar[str] = "mysql"
    server_name: ClassVar[str] = "mysqld"

    dist: MysqlDist | None = None

    def mysql(self) -> MysqlDist:
        if self.dist is None:
            from proxy.mysqldist import ensure_mysql

            self.dist = ensure_mysql()
        return self.dist

    def _server_environment(self) -> dict[str, str] | None:
        return self.mysql().process_environment()

    def _initialized_template(self) -> Path:
        """mysqld --initialize-insecure once per sandbox; instances copy the result."""
        if self._template is not None:
            return self._template
        assert self.base is not None
        dist = self.mysql()
        template = self.base / "template"
        scratch = self.base / "template-tmp"
        for leftover in (template, scratch):
            if leftover.exists():
                shutil.rmtree(leftover)
        scratch.mkdir()
        # root@localhost gets an empty password (socket only, like MariaDB's
        # install-db); the RSA key pair for caching_sha2_password is made here
        # too, so every instance copied from the template shares it.
        command = dist.command(
            "--no-defaults",
            "--initialize-insecure",
            f"--datadir={template}",
            f"--tmpdir={scratch}",
            *dist.server_options(),
            f"--log-error={self.base / 'template.log'}",
        )
        if os.geteuid() == 0:
            command.append("--user=root")
        result = subprocess.run(
            command, capture_output=True, text=True, check=False, env=dist.process_environment()
        )
        shutil.rmtree(scratch, ignore_errors=True)
        # auto.cnf holds the server UUID: every instance must make its own, or a
        # replica refuses a source with the same UUID (and GTIDs would collide).
        with contextlib.suppress(FileNotFoundError):
            (template / "auto.cnf").unlink()
        if result.returncode != 0:
            try:
                log = (self.base / "template.log").read_text(errors="replace")
            except OSError:
                log = ""
            raise SandboxError(
                f"mysqld --initialize-insecure failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}\n{log[-4000:]}"
            )
        self._template = template
        return template

    def _server_command(self, instance: Instance, options: tuple[str, ...], tls: bool) -> list[str]:
        dist = self.mysql()
        command = dist.command(
            "--no-defaults",  # must come first
            *dist.server_options(),
            *self._instance_options(instance),
            "--mysqlx=OFF",  # X Protocol would listen on 33060
            "--collation-server=utf8mb4_0900_ai_ci",
            # redo at least as large as the MariaDB sandbox's 256M log (MySQL's default is 100M),
            # so the two servers compare on equal terms in the migration benchmark
            ("--innodb-redo-log-capacity=512M" if dist.version_tuple >= (8, 0, 30)
             else "--innodb-log-file-size=256M"),
            "--secure-file-priv=",  # MariaDB's default: no restriction (the built-in dir does not exist here)
            *SERVER_OPTIONS,
            # MySQL would otherwise offer TLS with certificates it makes itself.
            # caching_sha2_password still works without it (RSA key exchange,
            # which pymysql does with cryptography).
            *self._tls_options(tls, off=("--tls-version=",)),
            *options,
            *self.server_options,
        )
        if os.geteuid() == 0:
            command.append("--user=root")
        return command

    def start_primary(self, name: str = "primary", server_id: int = 1, *, tls: bool = False) -> Instance:
        return self._spawn(name, server_id, MYSQL_PRIMARY_OPTIONS, "primary", tls)

    def start_replica(self, primary: Instance, name: str = "replica", server_id: int = 2) -> Instance:
        replica = self._spawn(
            name,
            server_id,
            (*MYSQL_PRIMARY_OPTIONS, "--read-only=1", "--skip-replica-start"),
            "replica",
        )
        # SOURCE_AUTO_POSITION: the replica's gtid_executed is empty (the account
        # setup is not binlogged), so it fetches the primary's whole binlog.
        # GET_SOURCE_PUBLIC_KEY: caching_sha2_password without TLS.
        replica.execute(
            f"CHANGE REPLICATION SOURCE TO SOURCE_HOST='127.0.0.1', SOURCE_PORT={primary.port}, "
            "SOURCE_USER='repl', SOURCE_PASSWORD='repl', SOURCE_AUTO_POSITION=1, "
            "SOURCE_CONNECT_RETRY=1, SOURCE_SSL=0, GET_SOURCE_PUBLIC_KEY=1",
            "START REPLICA",
        )
        wait_replica_caught_up(primary, replica)
        return replica


def wait_replica_caught_up(primary: Instance, replica: Instance, timeout: float = 60.0) -> None:
    """Block until the replica has applied everything the primary has written."""
    if primary.flavor == "mysql":
        _wait_mysql_replica(primary, replica, timeout)
        return
    (position,) = primary.execute("SELECT @@gtid_binlog_pos")[0]
    deadline = time.monotonic() + timeout
    while True:
        rows = replica.execute(f"SELECT MASTER_GTID_WAIT('{position}', 1)")
        if rows and rows[0][0] == 0:
            return
        if time.monotonic() > deadline:
            status = replica.execute("SHOW SLAVE STATUS")
            raise SandboxError(f"replica did not catch up to {position}: {status}")


def _wait_mysql_replica(primary: Instance, replica: Instance, timeout: float) -> None:
    (executed,) = primary.execute("SELECT @@GLOBAL.gtid_executed")[0]
    executed = str(executed).replace("\n", "")
    deadline = time.monotonic() + timeout
    while True:
        rows = replica.execute(f"SELECT WAIT_FOR_EXECUTED_GTID_SET('{executed}', 1)")
        if rows and rows[0][0] == 0:
            return
        status = _replica_status(replica)
        stopped = [
            f"{thread}: {status.get(f'Last_{thread}_Error')}"
            for thread in ("IO", "SQL")
            if status.get(f"Replica_{thread}_Running") == "No" and status.get(f"Last_{thread}_Errno")
        ]
        if stopped or time.monotonic() > deadline:
            raise SandboxError(
                f"replica {replica.name} did not catch up to {executed}: "
                f"{'; '.join(stopped) or status}"
            )


def _replica_status(replica: Instance) -> dict[str, Any]:
    connection = replica.connect(cursorclass=pymysql.cursors.DictCursor)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SHOW REPLICA STATUS")
            row = cursor.fetchone()
        return dict(row) if row else {}
    finally:
        connection.close()
