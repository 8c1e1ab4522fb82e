"""Kernel lifecycle of the app's Voilà pages: a closed page shuts its kernel down.

Voilà's page sends ``POST voila/api/shutdown/<kernel>`` from ``beforeunload`` with the ``_xsrf`` cookie's value
in the form. Tornado sets that cookie lazily, the first time a handler reads ``xsrf_token``, and Voilà's render
handler never reads it: the page has no ``_xsrf`` cookie, the form carries an empty token and Jupyter refuses
the shutdown (``403: '_xsrf' argument missing from POST``), so every visit left its kernel running. Reading the
token while the page is rendered sets the cookie (made by the server, on its base URL) and Voilà's own
shutdown call goes through. Kernels whose page died without ``beforeunload`` (a crashed tab, a lost network)
are culled by Jupyter's idle culler, which ``slideloop app`` and the hub configuration switch on.
"""

from __future__ import annotations

from typing import Any

#: Voilà's hook run before a page's kernel starts (``VoilaConfiguration.prelaunch_hook``)
HOOK = "prelaunch_hook"


def set_xsrf_cookie(req: Any, notebook: Any, cwd: str) -> Any:
    """Voilà prelaunch hook: give the page its ``_xsrf`` cookie so its kernel-shutdown call is accepted."""
    _ = req.xsrf_token  # tornado sets the cookie on first read; headers are not sent yet at this point
    return notebook


def chain(first: Any, second: Any) -> Any:
    """A prelaunch hook that runs ``first`` then ``second`` (each may return a replacement notebook)."""

    def hook(req: Any, notebook: Any, cwd: str) -> Any:
        notebook = first(req, notebook=notebook, cwd=cwd) or notebook
        return second(req, notebook=notebook, cwd=cwd) or notebook

    return hook


def install(serverapp: Any) -> None:
    """Add :func:`set_xsrf_cookie` to the server's Voilà configuration, before any hook configured already.

    Extensions load in name order, so ``slideloop_apps`` runs before ``voila.server_extension`` reads its
    configuration from the server's config."""
    voila_cfg = serverapp.config.VoilaConfiguration
    existing = voila_cfg.get(HOOK) if HOOK in voila_cfg else None
    voila_cfg[HOOK] = chain(set_xsrf_cookie, existing) if callable(existing) else set_xsrf_cookie
