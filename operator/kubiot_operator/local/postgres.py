"""A PostgreSQL cluster run as a child process: the local stack's database, and the tests'.

PostgreSQL refuses to run as root, so when run as root the server runs as an unprivileged
user (`nobody` by default) that owns the data directory.

    server = PostgresServer(Path(tempfile.mkdtemp())).start()
    conn = await asyncpg.connect(server.dsn)
    server.stop()    # an outage
    server.start()   # same data, same port
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kubiot_operator.local.ports import free_port, wait_for_port

POSTGRES_VERSIONS = ("15", "16", "17", "14")
DEFAULT_USER = "nobody"


class PostgresError(RuntimeError):
    """The cluster could not be created, started or stopped."""


def find_bindir() -> Path:
    for version in POSTGRES_VERSIONS:
        candidate = Path(f"/usr/lib/postgresql/{version}/bin")
        if (candidate / "initdb").exists():
            return candidate
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise PostgresError("PostgreSQL server binaries (initdb, pg_ctl) were not found")


class PostgresServer:
    """One cluster in `data_dir` on a loopback port, with trust authentication.

    Commits survive the server being killed (`stop("immediate")`), not the machine crashing:
    fsync is off unless `durable` is set.
    """

    def __init__(self, data_dir: Path, port: int | None = None, database: str = "kubiot",
                 superuser: str = "postgres", run_as: str = DEFAULT_USER,
                 bindir: Path | None = None, durable: bool = False) -> None:
        self.root = data_dir
        self.pgdata = data_dir / "pgdata"
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.database = database
        self.superuser = superuser
        self.bindir = bindir or find_bindir()
        #: fsync as in production (benchmarks); tests skip it for speed.
        self.durable = durable
        self._run_as = run_as if os.geteuid() == 0 else None

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.superuser}@{self.host}:{self.port}/{self.database}"

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    @property
    def running(self) -> bool:
        if not (self.pgdata / "postmaster.pid").exists():
            return False
        result = self._run([str(self.bindir / "pg_ctl"), "status", "-D", str(self.pgdata)],
                           check=False)
        return result.returncode == 0

    def _command(self, argv: list[str]) -> list[str]:
        if self._run_as is None:
            return argv
        return ["setpriv", f"--reuid={self._run_as}", f"--regid={self._gid()}", "--clear-groups",
                "--", *argv]

    def _gid(self) -> int:
        assert self._run_as is not None
        return pwd.getpwnam(self._run_as).pw_gid

    def _run(self, argv: list[str], check: bool = True,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self._command(argv), capture_output=True, text=True,
                                timeout=timeout, cwd="/", check=False)
        if check and result.returncode != 0:
            raise PostgresError(f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}\n"
                                f"{self.log_tail()}")
        return result

    def init(self) -> None:
        """Create the cluster once (a no-op when it exists)."""
        if (self.pgdata / "PG_VERSION").exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if self._run_as is not None:
            user = pwd.getpwnam(self._run_as)
            os.chown(self.root, user.pw_uid, user.pw_gid)
            # The server user must be able to reach its directory.
            self.root.chmod(0o700)
            for parent in self.root.parents:
                if parent.stat().st_mode & 0o001 == 0:
                    raise PostgresError(
                        f"{parent} is not searchable by {self._run_as}; put the cluster "
                        "under a directory like tempfile.mkdtemp()")
        self._run([str(self.bindir / "initdb"), "-D", str(self.pgdata), "-U", self.superuser,
                   "-A", "trust", "-E", "UTF8", "--no-sync", "--locale=C.UTF-8"])
        settings = {
            "listen_addresses": f"'{self.host}'",
            "unix_socket_directories": f"'{self.root}'",
            "max_connections": "50",
            "shared_buffers": "64MB",
        }
        if not self.durable:
            # A killed server keeps its commits without fsync; only a lost machine would not.
            settings |= {"fsync": "off", "full_page_writes": "off"}
        with (self.pgdata / "postgresql.conf").open("a") as conf:
            conf.write("\n# kubiot test cluster\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def start(self, timeout: float = 30.0) -> PostgresServer:
        """Start (creating the cluster the first time) and wait until it accepts connections."""
        self.init()
        if self.running:
            return self
        self._run([str(self.bindir / "pg_ctl"), "start", "-D", str(self.pgdata), "-w",
                   "-t", str(int(timeout)), "-l", str(self.log_file), "-o", f"-p {self.port}"],
                  timeout=timeout + 10)
        wait_for_port(self.host, self.port, timeout)
        if not self._database_exists():
            self.psql(f'CREATE DATABASE "{self.database}"', database="postgres")
        return self

    def _database_exists(self) -> bool:
        out = self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'",
                        database="postgres")
        return out.strip() == "1"

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Stop the server: `fast` (clean), or `immediate` (like a crash)."""
        if not self.running:
            return
        self._run([str(self.bindir / "pg_ctl"), "stop", "-D", str(self.pgdata), "-m", mode,
                   "-w", "-t", str(int(timeout))], timeout=timeout + 10)

    def psql(self, sql: str, database: str | None = None) -> str:
        """Run SQL with psql and return its unaligned, tuples-only output."""
        result = self._run([str(self.bindir / "psql"), "-h", self.host, "-p", str(self.port),
                            "-U", self.superuser, "-d", database or self.database, "-X", "-A",
                            "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        return result.stdout

    def destroy(self) -> None:
        self.stop(mode="immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text().splitlines()[-lines:])
        except (FileNotFoundError, PermissionError):
            return ""

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def postgres_server(**kwargs: object) -> Iterator[PostgresServer]:
    """A started cluster in a fresh temporary directory, removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="kubiot-pg-"))
    server = PostgresServer(root, **kwargs)  # type: ignore[arg-type]
    try:
        yield server.start()
    finally:
        server.destroy()
