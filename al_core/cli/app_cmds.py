"""App commands: ``slideloop app PROJECT`` opens the app's landing page, which links the review app (with its
Train tab) and the deployment view (``--view review|deploy`` opens one of them directly); ``slideloop demo``
does so on the bundled sample (``--prepare-only``: build the demo project and stop).

The app runs as ``jupyter server`` with Voilà and slideloop's tile server as server extensions (a standalone
``voila`` process would not load the tile server), started as a subprocess so that ``al_core`` itself never
imports Jupyter, tornado or widgets. The core is imported inside the commands, so ``slideloop --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from al_core._constants import PROJECT_ENV as PROJECT_ENV
from al_core._constants import SCHEDULER_ENV
from al_core.errors import ProjectError

APP_NOTEBOOK = "review.ipynb"
#: the app's views: --view name → notebook in the apps folder
VIEWS = {"home": "index.ipynb", "review": APP_NOTEBOOK, "deploy": "deploy.ipynb"}
DEFAULT_VIEW = "home"
DEFAULT_PORT = 8866
SAMPLE_NAME = "CMU-1-Small-Region"
#: Jupyter's idle culler, seconds: kernels with no page attached (a tab that died without closing its kernel)
#: are shut down after 15 idle minutes, checked every minute; an open page keeps its kernel (cull_connected off)
KERNEL_CULL = (900, 60)
#: kernels the app keeps started, with its modules imported, for the next page to open (one: a single user's app)
WARM_KERNELS = 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``app`` and ``demo`` subcommands."""
    p = sub.add_parser("app", help="open the app (review, training, deployment) on a project in a browser")
    p.add_argument("project", metavar="PROJECT", help="project folder")
    p.add_argument("--view", choices=sorted(VIEWS), default=DEFAULT_VIEW,
                   help="page to open: home (the landing page linking the other two; default), review (slide "
                        "map, queue, corrections, Train tab) or deploy (run a pushed model over a slide)")
    _server_args(p)
    p.set_defaults(func=cmd_app)

    p = sub.add_parser("demo", help="build a demo project from the bundled sample slide and open the app")
    p.add_argument("--dir", default="demo-project", help="project folder (made if missing; default ./demo-project)")
    p.add_argument("--view", choices=sorted(VIEWS), default=DEFAULT_VIEW, help="page to open (as for 'app')")
    p.add_argument("--sample", metavar="DIR",
                   help="folder holding the sample slide and its pre-annotation (default: the source tree's "
                        "data/sample; give it when slideloop is installed from a wheel, as on Binder)")
    p.add_argument("--prepare-only", action="store_true",
                   help="only build the demo project (e.g. in an image's build step) and print its folder")
    _server_args(p)
    p.set_defaults(func=cmd_demo)


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--ip", default="localhost", help="interface to listen on (default localhost only)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser")


def kernel_cull_args(idle_timeout: int = KERNEL_CULL[0], interval: int = KERNEL_CULL[1]) -> list[str]:
    """The ``jupyter server`` options that switch Jupyter's idle-kernel culler on."""
    return [f"--MappingKernelManager.cull_idle_timeout={idle_timeout}",
            f"--MappingKernelManager.cull_interval={interval}"]


def app_notebook_dir() -> Path:
    """The folder holding ``review.ipynb``: the source tree's ``apps/``, or the installed data copy."""
    import importlib.util

    spec = importlib.util.find_spec("slideloop_apps")
    candidates = []
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).resolve().parents[1])
    candidates.append(Path(sys.prefix) / "share" / "slideloop" / "apps")
    for folder in candidates:
        if (folder / APP_NOTEBOOK).is_file():
            return folder
    raise ProjectError("the review app is not installed (no review.ipynb); reinstall slideloop")


def server_command(project: Path, port: int, ip: str, open_browser: bool, view: str = DEFAULT_VIEW,
                   cull: tuple[int, int] = KERNEL_CULL, warm: int = WARM_KERNELS) -> list[str]:
    """The ``jupyter server`` command line of the app (Voilà + tile server as extensions); ``view`` picks the
    notebook the browser opens (all are served either way); ``cull``: idle timeout and check interval, s;
    ``warm``: kernels kept started for the next page."""
    return [
        sys.executable, "-m", "jupyter_server",
        f"--ServerApp.root_dir={app_notebook_dir()}",
        f"--ServerApp.default_url=/voila/render/{VIEWS[view]}",
        f"--ServerApp.ip={ip}",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",  # the printed URL must be the one the server really uses
        f"--ServerApp.open_browser={open_browser}",
        # enabled by their config.d files on install; named here too so a source checkout works as is
        "--ServerApp.jpserver_extensions=voila.server_extension=True",
        "--ServerApp.jpserver_extensions=slideloop_apps=True",
        "--ServerApp.jpserver_extensions=jupyter_server_mathjax=True",
        f"--SlideloopTiles.project={project}",
        # a started kernel with the app imported waits for the next page: no kernel start on opening a view
        "--ServerApp.kernel_manager_class=slideloop_apps.kernels.WarmKernelManager",
        f"--WarmKernelManager.warm_kernels={warm}",
        *kernel_cull_args(*cull),
        # containers (Docker, Binder-like images) often run as root; Jupyter refuses that unless told
        *(["--ServerApp.allow_root=True"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
    ]


def run_app(project: Path, port: int, ip: str, open_browser: bool, view: str = DEFAULT_VIEW) -> int:
    """Serve the app on ``project`` (its URL printed once the server answers) until it exits or Ctrl-C; returns the server's exit status.

    Starts a Dask scheduler and worker for training jobs unless the environment names one; raises
    ``ProjectError`` for the review view of a project without slides."""
    from al_core.cli.job_cluster import job_cluster
    from al_core.project.project import Project

    with Project.open(project) as proj:  # a clear error now beats a blank page later
        # the deployment view can upload a slide into an empty project; the review app needs one
        if not proj.slides() and view == "review":
            raise ProjectError(f"{project}: the project has no slides; add one with 'slideloop add'")
    import secrets  # here, not at the top: every command imports this module to build the parser

    token = os.environ.get("JUPYTER_TOKEN") or secrets.token_hex(24)
    # the token goes through the environment, not the command line, where `ps` would show it to other users
    env = dict(os.environ, JUPYTER_TOKEN=token, **{PROJECT_ENV: str(project.resolve())})
    # one Dask scheduler + worker per app, not a LocalCluster per kernel: every tab's kernel queues training on
    # the same worker and a job outlives its kernel; a shared scheduler (a hub service) already named wins
    cluster = contextlib.ExitStack()
    if not env.get(SCHEDULER_ENV):
        env[SCHEDULER_ENV] = cluster.enter_context(job_cluster())
    host = "localhost" if ip in ("localhost", "127.0.0.1", "0.0.0.0", "") else ip
    what = {"home": "app", "review": "review app", "deploy": "deployment view"}[view]
    with cluster:
        proc = subprocess.Popen(server_command(project.resolve(), port, ip, open_browser, view), env=env)
        try:
            # the URL is printed once the server answers: a URL that refuses connections looks like a failure
            if not wait_until_serving(proc, f"http://{host}:{port}/", token):
                return proc.wait()
            print(f"slideloop: {what} for {project} (Ctrl-C to stop)\n"
                  f"    To open it, copy and paste this URL into a browser:\n"
                  f"        http://{host}:{port}/voila/render/{VIEWS[view]}?token={token}", flush=True)
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait(timeout=30)
            return 0


def wait_until_serving(proc: subprocess.Popen[bytes], root: str, token: str, poll: float = 0.2) -> bool:
    """Wait until the server at ``root`` answers its status API (True) or its process exits (False)."""
    import urllib.error  # brings http.client, email and ssl (25-50 ms here), which no other command needs
    import urllib.request

    req = urllib.request.Request(root + "api/status", headers={"Authorization": f"token {token}"})
    while proc.poll() is None:
        try:
            with urllib.request.urlopen(req, timeout=5):
                return True
        except urllib.error.HTTPError:
            return True  # it answers, if not with 200 (a proxy or an auth setting of the user's): it is up
        except OSError:
            time.sleep(poll)  # not listening yet
    return False


def cmd_app(args: argparse.Namespace) -> int:
    """``slideloop app``: serve the app on a project."""
    return run_app(Path(args.project), args.port, args.ip, not args.no_browser, args.view)


def sample_dir() -> Path:
    """The bundled sample (``data/sample`` of the source tree)."""
    folder = Path(__file__).resolve().parents[2] / "data" / "sample"
    if not (folder / f"{SAMPLE_NAME}.svs").is_file():
        raise ProjectError(f"the bundled sample slide is not here ({folder}); run the demo from a source checkout")
    return folder


def build_demo(folder: Path, sample: Path | None = None) -> Path:
    """Make the demo project (sample slide, 256-px patch grid, its pre-annotation) unless it exists; the sample
    comes from ``sample`` or the source tree."""
    if (folder / "project.db").is_file():
        return folder
    sample = sample or sample_dir()
    if not (sample / f"{SAMPLE_NAME}.svs").is_file():
        raise ProjectError(f"{sample}: no {SAMPLE_NAME}.svs here (the bundled sample is in data/sample)")
    from al_core.project.project import Project
    from al_core.wsi.grid import GridSpec

    with Project.create(folder) as proj:
        proj.add_slide(sample / f"{SAMPLE_NAME}.svs")
        proj.build_grid(GridSpec(patch=256))
        proj.import_labels(sample / f"{SAMPLE_NAME}.preannotation.geojson", author="preannotation")
    print(f"slideloop: made the demo project {folder}", flush=True)
    return folder


def cmd_demo(args: argparse.Namespace) -> int:
    """``slideloop demo``: build the demo project if missing, then serve the app on it (or print its folder)."""
    folder = build_demo(Path(args.dir), Path(args.sample) if args.sample else None)
    if args.prepare_only:
        print(folder.resolve(), flush=True)
        return 0
    return run_app(folder, args.port, args.ip, not args.no_browser, args.view)
