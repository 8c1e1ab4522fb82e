"""The example hub of ``deploy/jupyterhub_config.py`` run for real on loopback, for tests and the load benchmark:
the example as deployed, with a shared-password authenticator, local-process spawner, free ports and the state
files in a work folder on top."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from _browser import free_port, http_status, wait_until_up

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "jupyterhub_config.py"


@dataclass
class Hub:
    """A running hub: its public URL, the Dask scheduler of its job queue, and the hub's log."""

    url: str
    scheduler: str
    log: Path
    proc: subprocess.Popen[bytes]


def free_low_port() -> int:
    """A free port below Linux's ephemeral range. The worker service dials the scheduler's port until the
    scheduler listens; were that port ephemeral, one dial could bind it as its own source port (TCP
    self-connect) and the scheduler then fails with 'Address already in use' (seen here)."""
    for port in random.sample(range(20000, 32000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def hub_config(work: Path, password: str, hub_port: int, api_port: int, spawn_timeout: int) -> Path:
    """Write the loopback hub's config into ``work``: the example, then the local overrides."""
    path = work / "jupyterhub_config.py"
    path.write_text(
        f"load_subconfig({str(EXAMPLE)!r})\n"
        "c = get_config()\n"
        # DummyAuthenticator's password option, renamed in JupyterHub 5.3
        "c.JupyterHub.authenticator_class = 'shared-password'\n"
        f"c.SharedPasswordAuthenticator.user_password = {password!r}\n"
        "c.JupyterHub.spawner_class = 'simple'\n"
        f"c.SimpleLocalProcessSpawner.home_dir_template = {str(work / 'home' / '{username}')!r}\n"
        f"c.JupyterHub.hub_bind_url = 'http://127.0.0.1:{hub_port}'\n"
        f"c.ConfigurableHTTPProxy.api_url = 'http://127.0.0.1:{api_port}'\n"
        f"c.ConfigurableHTTPProxy.pid_file = {str(work / 'proxy.pid')!r}\n"
        f"c.JupyterHub.db_url = 'sqlite:///{work / 'hub.sqlite'}'\n"
        f"c.JupyterHub.cookie_secret_file = {str(work / 'cookie_secret')!r}\n"
        f"c.Spawner.start_timeout = {spawn_timeout}\n"
        f"c.Spawner.http_timeout = {spawn_timeout}\n")
    return path


@contextmanager
def run_hub(work: Path, projects_root: Path, password: str, spawn_timeout: int = 120,
            start_timeout: float = 120) -> Iterator[Hub]:
    """Start the hub (with its scheduler and worker services) serving the projects under ``projects_root``;
    stopped on exit, with the users' servers and the services."""
    port, hub_port, api_port, sched_port = free_port(), free_port(), free_port(), free_low_port()
    config = hub_config(work, password, hub_port, api_port, spawn_timeout)
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, SLIDELOOP_HUB_URL=url, SLIDELOOP_PROJECTS_ROOT=str(projects_root.resolve()),
               SLIDELOOP_SCHEDULER_PORT=str(sched_port), PYTHONWARNINGS="ignore")
    env.pop("SLIDELOOP_SCHEDULER", None)
    env.pop("SLIDELOOP_PROJECT", None)
    log = work / "hub.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(config)],
                                cwd=work, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_until_up(proc, lambda: http_status(f"{url}/hub/api/"), log, "jupyterhub", start_timeout)
        yield Hub(url, f"tcp://127.0.0.1:{sched_port}", log, proc)
    finally:
        proc.terminate()  # the hub stops the proxy, the users' servers and its services
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
