"""A real PostgreSQL for the store's tests: initdb and pg_ctl (PostgreSQL 15, from apt's
``postgresql``) in a temporary folder on a free port, run as an unprivileged user when the
tests run as root (initdb refuses root). ``pg_url()`` gives a fresh empty database each call.
Tests skip, saying why, when the binaries or psycopg are missing."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time

import pytest

from tests.conftest import free_port

BIN = os.environ.get("TTCS_PG_BIN", "/usr/lib/postgresql/15/bin")


class Postgres:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="ttcs-pg-")
        self.port = free_port()
        self.user = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    self.user = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self._run(f"{BIN}/initdb", "-D", f"{self.dir}/data", "-A", "trust", "-U", "ttcs",
                  "--no-sync", "-E", "UTF8")
        self._run(f"{BIN}/pg_ctl", "-D", f"{self.dir}/data", "-l", f"{self.dir}/log", "-w",
                  "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
                  " -c fsync=off -c shared_buffers=64MB", "start")
        self.n = 0

    def _run(self, *cmd: str) -> None:
        def demote():
            if self.user is not None:
                os.setgid(self.user.pw_gid)
                os.setuid(self.user.pw_uid)

        out = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=demote,
                             cwd=self.dir, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{cmd[0]}: {out.stdout}{out.stderr}")

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://ttcs@127.0.0.1:{self.port}/{db}"

    def new_db(self) -> str:
        import psycopg

        self.n += 1
        name = f"t{self.n}_{int(time.time() * 1000) % 10**6}"
        with psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run(f"{BIN}/pg_ctl", "-D", f"{self.dir}/data", "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def why_no_postgres() -> str | None:
    if not os.path.exists(f"{BIN}/initdb"):
        return f"PostgreSQL binaries not found in {BIN} (apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg (3) is not installed: pip install 'ttcs-agent[ctl]'"
    return None


@pytest.fixture(scope="module", name="postgres")
def postgres_fixture():
    why = why_no_postgres()
    if why:
        pytest.skip(why)
    pg = Postgres()
    yield pg
    pg.stop()


@pytest.fixture(name="pg_url")
def pg_url_fixture(postgres):
    """A fresh, empty PostgreSQL database for one test."""
    return postgres.new_db()
