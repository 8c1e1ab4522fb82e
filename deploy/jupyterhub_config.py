"""JupyterHub for several annotators on one GPU server (example; adapt authenticator, spawner and paths).

    SLIDELOOP_PROJECTS_ROOT=/srv/slideloop/projects jupyterhub -f deploy/jupyterhub_config.py

Run it with the Python environment slideloop is installed in (the hub, the single-user servers and the Dask
services all use that environment's interpreter), with npm's ``configurable-http-proxy`` on the PATH.

What it sets up:

- **The app under /user/<name>/.** Every user's single-user server (``jupyterhub-singleuser``) runs Voilà and
  slideloop's tile server as server extensions and opens ``/user/<name>/voila/render/index.ipynb``, the landing
  page linking the review (with its Train tab) and deployment views. Tiles are served under
  ``/user/<name>/slideloop/...`` behind the hub's OAuth: only that user (and admins) can fetch them.
- **Where projects live.** ``SLIDELOOP_PROJECT`` of user NAME is ``$SLIDELOOP_PROJECTS_ROOT/NAME`` (default
  ``/srv/slideloop/projects/NAME``), one SQLite project per user. Make it with ``slideloop init`` / ``add`` /
  ``grid`` before the user's first login; the user's server process must be able to write it.
- **One job queue for the one GPU.** A Dask scheduler and one worker run as hub services; every user's
  training and prediction job goes through that queue. The worker declares ``--resources GPU=1`` and every
  job asks for it, so jobs run one at a time, first come first served, and a job keeps running when the user's
  kernel or browser goes away. One more worker per extra GPU (``CUDA_VISIBLE_DEVICES`` set per worker).
  The worker writes the job's results into the project it names, so it must be able to write every project.
- **A shared project for several annotators.** Set ``SLIDELOOP_SHARED_PROJECT=/shared/disk/proj`` and
  ``SLIDELOOP_DB_URL=postgresql+psycopg://user:pass@dbhost/slideloop``: every user opens that one project
  folder (slides, checkpoints and predictions on the shared disk) and its tables live in PostgreSQL, which
  ``Project.open`` reads from ``SLIDELOOP_DB_URL`` (SQLite over NFS with several writers is unsafe). Every
  correction is a new label version with its author (``JUPYTERHUB_USER``), so concurrent annotators never
  overwrite each other. Keep the password out of this file: put the URL in the hub's environment.

Settings read from the hub's environment: ``SLIDELOOP_HUB_URL`` (public URL, default http://127.0.0.1:8000),
``SLIDELOOP_HUB_AUTHENTICATOR`` (default ``pam``: system accounts), ``SLIDELOOP_PROJECTS_ROOT``,
``SLIDELOOP_SCHEDULER_PORT`` (default 8786, loopback only), ``SLIDELOOP_GPU`` (the worker's
``CUDA_VISIBLE_DEVICES``, default 0), ``SLIDELOOP_SHARED_PROJECT`` and ``SLIDELOOP_DB_URL``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from al_core._constants import RESOURCE, SCHEDULER_ENV
from al_core.cli.app_cmds import PROJECT_ENV, app_notebook_dir, kernel_cull_args

c = get_config()  # noqa: F821 - provided by JupyterHub when it loads this file

python = sys.executable
projects_root = Path(os.environ.get("SLIDELOOP_PROJECTS_ROOT", "/srv/slideloop/projects"))
shared_project = os.environ.get("SLIDELOOP_SHARED_PROJECT", "")
db_url = os.environ.get("SLIDELOOP_DB_URL", "")
# keep it below the ephemeral range (32768+): the worker dials it before the scheduler listens
scheduler_port = int(os.environ.get("SLIDELOOP_SCHEDULER_PORT", "8786"))
scheduler = f"tcp://127.0.0.1:{scheduler_port}"

c.JupyterHub.bind_url = os.environ.get("SLIDELOOP_HUB_URL", "http://127.0.0.1:8000")
c.JupyterHub.authenticator_class = os.environ.get("SLIDELOOP_HUB_AUTHENTICATOR", "pam")
c.Authenticator.allow_all = True

# --- the single-user servers: Voilà + the tile server, the landing page by default -----------------------
c.Spawner.cmd = [str(Path(python).with_name("jupyterhub-singleuser"))]
c.Spawner.notebook_dir = str(app_notebook_dir())  # the app notebooks, not the user's home
c.Spawner.default_url = "/voila/render/index.ipynb"
# enabled by their config.d files on install; named here too so a source checkout works as is
c.Spawner.args = [
    "--ServerApp.jpserver_extensions=voila.server_extension=True",
    "--ServerApp.jpserver_extensions=slideloop_apps=True",
    "--ServerApp.jpserver_extensions=jupyter_server_mathjax=True",
    # kernels of pages that died without closing them are culled after 15 idle minutes (closed pages shut
    # theirs down at once): a shared server must not fill its memory with orphaned kernels
    *kernel_cull_args(),
    # no warm kernel here (slideloop_apps.kernels.WarmKernelManager, which `slideloop app` runs with one): it
    # saves a page a few seconds but holds one more idle kernel per user; where memory allows, add
    # "--ServerApp.kernel_manager_class=slideloop_apps.kernels.WarmKernelManager",
    # "--WarmKernelManager.warm_kernels=1",
    # containers often run everything as root, which Jupyter refuses unless told
    *(["--ServerApp.allow_root=True"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
]


def _user_project(spawner: Any) -> str:
    """The project folder of the spawning user: the shared one when configured, else their own."""
    return shared_project or str(projects_root / spawner.user.name)


# callables are evaluated per spawn with that user's spawner (JupyterHub's Spawner.environment)
c.Spawner.environment = {
    PROJECT_ENV: _user_project,
    SCHEDULER_ENV: scheduler,
    **({"SLIDELOOP_DB_URL": db_url} if db_url else {}),
}

# --- the shared job queue: one scheduler, one worker per GPU (GPU=1: one job at a time) -------------------
c.JupyterHub.services = [
    {
        "name": "slideloop-scheduler",
        "command": [python, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                    "--port", str(scheduler_port), "--no-dashboard"],
    },
    {
        "name": "slideloop-gpu-worker",
        # the worker retries until the scheduler (started just before) listens
        "command": [python, "-m", "distributed.cli.dask_worker", scheduler, "--nthreads", "1", "--nworkers", "1",
                    "--resources", f"{RESOURCE}=1", "--no-dashboard"],
        "environment": {
            "CUDA_VISIBLE_DEVICES": os.environ.get("SLIDELOOP_GPU", "0"),
            **({"SLIDELOOP_DB_URL": db_url} if db_url else {}),
        },
    },
]
