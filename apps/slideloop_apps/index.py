"""The landing page (``index.ipynb``): the project at a glance and links to the app's views.

The views are the landing page's sibling notebooks, so the links are relative to the page: they keep the
server's base URL (``/``, ``/user/<name>/`` on a hub, ``/binder/jupyter/user/<id>/``) and the notebooks' folder
below the server root (``apps/`` on Binder, where the root is the repository)."""

from __future__ import annotations

import html
import os
from urllib.parse import quote

import ipywidgets as w

from al_core.errors import SlideloopError
from al_core.project.project import Project
from slideloop_apps import PROJECT_ENV
from slideloop_apps.ui import message_html

#: the views the page links, in order: (notebook, title, what it is for)
VIEWS = (
    ("review.ipynb", "Review &amp; train",
     "the slide map, the review queue (worst patches first), drawing tools to correct a patch, and the Train tab "
     "to train or retrain a model on the shared job queue"),
    ("deploy.ipynb", "Deploy",
     "run a pushed ONNX model over a whole slide into a pyramidal class map, GeoJSON polygons and a timing "
     "report"),
)


def view_url(notebook: str) -> str:
    """A view's link, relative to the landing page (``<base_url>voila/render/<folder>/index.ipynb``)."""
    return quote(notebook)


def project_summary() -> str:
    """One line about the project in ``SLIDELOOP_PROJECT``; raises :class:`SlideloopError` when it cannot open."""
    path = os.environ.get(PROJECT_ENV)
    if not path:
        raise SlideloopError(f"no project given: start the app with 'slideloop app PROJECT' or set {PROJECT_ENV}")
    with Project.open(path) as proj:
        slides, patches = len(proj.slides()), len(proj.patches())
        root = proj.root
    return (f"Project <b>{html.escape(root.name)}</b> — {slides} slide{'s' * (slides != 1)}, "
            f"{patches} patch{'es' * (patches != 1)}")


def build_index() -> w.Widget:
    """The landing page: a project line (or why it cannot open) and one card per view."""
    try:
        summary = f"<p class='slideloop-summary'>{project_summary()}</p>"
    except SlideloopError as err:
        summary = message_html(f"slideloop cannot open the project: {err}", "error")
    cards = "".join(
        f"<a class='slideloop-view-link' href='{html.escape(view_url(nb))}' "
        f"style='display:block;padding:12px 16px;margin:8px 0;border:1px solid #ccc;border-radius:6px;"
        f"text-decoration:none;color:inherit;max-width:640px'>"
        f"<b style='font-size:1.1em;color:#1a5fb4'>{title}</b><br><span>{what}</span></a>"
        for nb, title, what in VIEWS)
    return w.HTML(f"<div class='slideloop-index'><h2>slideloop</h2>{summary}{cards}</div>")
