"""A throwaway PostgreSQL cluster for the store tests: ``initdb`` into a temporary folder, the server on a Unix
socket in that folder (no TCP port), removed at the end. ``SLIDELOOP_TEST_PG_URL`` points the tests at an
existing server instead (one database per test is created in it).

PostgreSQL refuses to run as root, so as root (CI containers) the cluster runs as the ``postgres`` system user
that Debian's package creates.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

URL_ENV = "SLIDELOOP_TEST_PG_URL"


def pg_bin() -> Path | None:
    """The folder of PostgreSQL's server programs (Debian: /usr/lib/postgresql/<version>/bin), or None."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(dirs[-1]).parent if dirs else None


def _as_owner(cmd: list[str], owner: str | None) -> list[str]:
    return ["runuser", "-u", owner, "--", *cmd] if owner else cmd


@contextmanager
def pg_cluster() -> Iterator[str]:
    """Start a cluster; yields a server URL (``postgresql+psycopg://user@/postgres?host=<socket dir>``)."""
    bindir = pg_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL's server programs (initdb, pg_ctl) are not installed")
    owner = "postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="slideloop-pg-"))
    data, sock = root / "data", root / "sock"
    data.mkdir()
    sock.mkdir()
    if owner:
        shutil.chown(root, owner)
        shutil.chown(data, owner)
        shutil.chown(sock, owner)
    user = owner or os.environ.get("USER") or "postgres"
    try:
        subprocess.run(_as_owner([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", user, "-E", "UTF8"],
                                 owner), check=True, capture_output=True)
        opts = f"-c listen_addresses='' -c unix_socket_directories={sock} -c fsync=off -c max_connections=50"
        subprocess.run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"),
                                  "-w", "-t", "60", "start"], owner), check=True, capture_output=True)
        yield f"postgresql+psycopg://{user}@/postgres?host={sock}"
    finally:
        subprocess.run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], owner),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def new_database(server_url: str) -> str:
    """Create an empty database on the server; returns its URL."""
    import sqlalchemy as sa

    name = f"slideloop_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        for attempt in range(50):
            try:
                with engine.connect() as conn:
                    conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
                break
            except sa.exc.OperationalError:
                if attempt == 49:
                    raise
                time.sleep(0.2)
    finally:
        engine.dispose()
    base, _, query = server_url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")
