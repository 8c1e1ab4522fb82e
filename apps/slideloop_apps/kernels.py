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

import asyncio
import base64
import json
import os
from typing import Any

from jupyter_server._tz import utcnow
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from traitlets import Float, Int, TraitError, Unicode

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


#: seconds the server's shutdown waits for a warming kernel to finish its imports before it cancels it
SHUTDOWN_WAIT_S = 10.0
#: what a warm kernel runs before it waits for a page: the views' modules, and the Train tab's empty chart
#: (matplotlib's import and first draw are a second of a cold build); nothing that reads the project
WARM_CODE = ("import slideloop_apps.deploy, slideloop_apps.index, slideloop_apps.review\n"
             "from slideloop_apps.train_panel import empty_curves\n"
             "from slideloop_apps.training import TrainSettings\n"
             "empty_curves(TrainSettings.epochs)")


def _setup_code(env: dict[str, str], cwd: str) -> str:
    """Kernel code that adds ``env`` to its environment and moves to ``cwd``; the values travel as base64 JSON,
    out of reach of IPython's input syntax (``?``, ``!``, ``%`` in a URL or a path)."""
    data = base64.b64encode(json.dumps({"env": env, "cwd": cwd}).encode()).decode()
    return ("import base64 as _b, json as _j, os as _o\n"
            f"_s = _j.loads(_b.b64decode('{data}'))\n_o.environ.update(_s['env'])\n_o.chdir(_s['cwd'])\n"
            "del _b, _j, _o, _s")


class WarmKernelManager(AsyncMappingKernelManager):
    """Jupyter's kernel manager with a pool of started kernels that have imported the app already.

    Voilà's own ``preheat_kernel`` needs the standalone ``voila`` application (its kernel manager reads the
    VoilaApp's templates and settings, and it refuses a ``prelaunch_hook``, which :func:`set_xsrf_cookie` is), so
    the app, a ``jupyter server`` extension, keeps this equivalent: a page's ``start_kernel`` takes a kernel
    from the pool, gives it the page's environment and working folder, and the pool refills in the background.
    That skips the kernel start and the imports (about half of a cold first paint); the notebook itself still
    runs per page, so every page shows the project as it is when opened."""

    warm_kernels = Int(0, config=True, help="started kernels kept waiting for the next page (0: none)")
    warm_code = Unicode(WARM_CODE, config=True, help="code a warm kernel runs before it joins the pool")
    refill_delay = Float(3.0, config=True,
                         help="seconds after a page took a kernel before the pool starts its replacement "
                              "(a kernel start competes with that page's first render for the cores)")

    def __init__(self, **kwargs: Any) -> None:
        self._base.__init__(**kwargs)
        self._warm: list[tuple[str, dict[str, str]]] = []  # (kernel id, the env it was started with)
        self._warming = 0
        self._fills: set[asyncio.Future[None]] = set()  # refills running or waiting for their delay
        self._closing = False

    @property
    def _base(self) -> Any:
        """Jupyter's own kernel manager methods (untyped: reached through Any)."""
        return super()

    def _kernel(self, kernel_id: str) -> Any:
        return self.get_kernel(kernel_id)

    def warm_ids(self) -> list[str]:
        """Ids of the kernels waiting in the pool."""
        return [kid for kid, _ in self._warm]

    async def fill(self, delay: float = 0.0) -> None:
        """Start warm kernels until the pool holds ``warm_kernels``; a failed one is logged and dropped."""
        if delay:
            await asyncio.sleep(delay)
        while not self._closing and len(self._warm) + self._warming < self.warm_kernels:
            self._warming += 1
            try:
                env = dict(os.environ)
                kid = await self._base.start_kernel(path="", env=env)
                try:
                    await self._run(kid, self.warm_code)
                except Exception:
                    self.log.exception("slideloop: warm kernel %s failed its imports; shutting it down", kid)
                    await self._base.shutdown_kernel(kid)
                    return
                self._warm.append((kid, env))
                self.log.info("slideloop: warm kernel %s ready (%d in the pool)", kid, len(self._warm))
            finally:
                self._warming -= 1

    async def _run(self, kernel_id: str, code: str, timeout: float = 120) -> None:
        """Execute ``code`` in a kernel and wait for its reply; RuntimeError if it raised."""
        client = self._kernel(kernel_id).client()
        client.start_channels()
        try:
            await client.wait_for_ready(timeout=timeout)
            msg_id = client.execute(code, silent=True, store_history=False)
            while True:
                reply = await client.get_shell_msg(timeout=timeout)
                if reply["parent_header"].get("msg_id") == msg_id:
                    break
            if reply["content"]["status"] != "ok":
                raise RuntimeError(f"{reply['content'].get('ename')}: {reply['content'].get('evalue')}")
        finally:
            client.stop_channels()

    async def start_kernel(  # type: ignore[override]
            self, *, kernel_id: str | None = None, path: str | None = None, **kwargs: Any) -> str:
        """A warm kernel set up as ``kwargs`` asks (env, working folder) when one waits; else a new one."""
        name = kwargs.get("kernel_name")
        while kernel_id is None and self._warming and not self._warm:
            await asyncio.sleep(0.1)  # one is nearly ready (a page opened just after the server started)
        if kernel_id is None and self._warm and name in (None, self.default_kernel_name):
            kid, started_env = self._warm.pop(0)
            self.refill(self.refill_delay)
            env = kwargs.get("env") or {}
            changed = {k: v for k, v in env.items() if started_env.get(k) != v}
            cwd = str(self._base.cwd_for_path(path or "", env=env))
            try:
                await self._run(kid, _setup_code(changed, cwd))
            except Exception:
                self.log.exception("slideloop: warm kernel %s could not take the page; starting a new one", kid)
                await self._base.shutdown_kernel(kid)
            else:
                self._kernel(kid).last_activity = utcnow()  # for the culler: the page starts its idle clock
                self.log.info("slideloop: page given warm kernel %s", kid)
                return kid
        return str(await self._base.start_kernel(kernel_id=kernel_id, path=path, **kwargs))

    def refill(self, delay: float = 0.0) -> None:
        """Start filling the pool in the background (after ``delay`` s); the server's shutdown waits for it."""
        if self._closing:
            return
        task = asyncio.ensure_future(self.fill(delay))
        self._fills.add(task)
        task.add_done_callback(self._fills.discard)

    async def shutdown_all(self, now: bool = False) -> None:  # type: ignore[override]
        """Stop refilling, let a kernel that is warming finish its imports (a kernel shut down mid-execute logs
        a ZMQ traceback), then shut every kernel down as Jupyter does."""
        self._closing = True
        if self._fills:
            _, late = await asyncio.wait(set(self._fills), timeout=SHUTDOWN_WAIT_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self._base.shutdown_all(now=now)

    async def shutdown_kernel(self, kernel_id: str, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Shut a kernel down, dropping it from the pool if it waited there."""
        self._warm = [(k, e) for k, e in self._warm if k != kernel_id]
        await self._base.shutdown_kernel(kernel_id, *args, **kwargs)

    def kernel_model(self, kernel_id: str) -> dict[str, Any]:
        """Jupyter's kernel model, also for a kernel still starting (the pool starts them while pages list
        kernels): Jupyter sets ``last_activity`` only once the start returns, and its ``GET /api/kernels`` fails
        with a 500 for every kernel in between (seen in CI while the pool refilled)."""
        kernel = self._kernels.get(kernel_id)
        if kernel is not None:
            try:
                kernel.last_activity  # noqa: B018 (raises while unset)
            except TraitError:
                kernel.last_activity = utcnow()
        return dict(self._base.kernel_model(kernel_id))

    async def cull_kernel_if_idle(self, kernel_id: str) -> None:
        """Jupyter's idle culler, except for the pool's kernels: they are idle by design."""
        if kernel_id in self.warm_ids():
            return
        await self._base.cull_kernel_if_idle(kernel_id)
