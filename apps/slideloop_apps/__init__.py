"""slideloop's Jupyter side: the tile-serving server extension and the review app's widgets.

The server extension is loaded by ``jupyter server`` / JupyterLab / JupyterHub single-user servers (enabled on
install by ``etc/jupyter/jupyter_server_config.d/slideloop_apps.json``); the widgets run in the kernel of the
Voilà app ``review.ipynb``. Both call :mod:`al_core`; nothing in ``al_core`` imports this package.

Environment variables:

``SLIDELOOP_PROJECT``
    the project folder the tile server and the review app open (set by ``slideloop app``).
``SLIDELOOP_BASE_URL``
    the Jupyter server's base URL; set by the extension when it loads, so kernels it starts inherit it and
    build tile URLs that work at ``/``, under ``/user/<name>/`` (JupyterHub) or on Binder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from al_core._constants import PROJECT_ENV

__all__ = ["BASE_URL_ENV", "DATA_DIR", "PROJECT_ENV", "ROUTE_PREFIX"]

BASE_URL_ENV = "SLIDELOOP_BASE_URL"
#: every route of the extension lives under ``<base_url>slideloop/``
ROUTE_PREFIX = "slideloop"
#: a Jupyter data directory (``voila/templates/slideloop``) shipped inside the package
DATA_DIR = Path(__file__).parent / "_data"


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    return [{"module": "slideloop_apps"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    # imported here so that kernels importing the widgets never import tornado handlers they do not use
    from slideloop_apps.server import load_extension

    load_extension(serverapp)
