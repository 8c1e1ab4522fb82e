"""Many slides as Dask tasks, on a LocalCluster or a scheduler the user names."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from al_core._guards import check_output
from al_core.deploy.config import InferenceConfig
from al_core.deploy.infer import infer_slide
from al_core.deploy.segmenter import OnnxSegmenter
from al_core.errors import SlideError, SlideloopError


def _infer_task(model: str, slide: str, output: str, config: dict[str, Any] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    cfg = InferenceConfig.from_dict(config) if config is not None else None
    return infer_slide(model, slide, output, config=cfg, **kwargs).to_dict()


def infer_many(
    model: str | os.PathLike[str],
    slides: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    config: InferenceConfig | str | os.PathLike[str] | None = None,
    scheduler: str | None = None,
    n_workers: int = 1,
    progress: Callable[[dict[str, Any]], None] | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Run :func:`infer_slide` for each slide as a Dask task; outputs go to ``out_dir/<slide stem>.tiff``.

    ``scheduler`` is a ``dask.distributed`` address (``tcp://host:8786``); without it a LocalCluster with
    ``n_workers`` single-threaded worker processes is started (one is right for one machine: ONNX Runtime
    already uses every core). The model and slides must be readable at the same paths on the workers.
    A slide that fails gives an ``{"slide", "error"}`` entry; the others go on. Results are in input order.
    """
    from dask.distributed import Client, LocalCluster, as_completed

    out = Path(out_dir)
    if out.suffix:
        raise ValueError(f"{out}: with several slides (or a scheduler) the output is a folder, not a file")
    # fail early, in the client, on a bad model/config rather than once per slide on the cluster
    seg = OnnxSegmenter(model, config, providers=kwargs.get("providers"))
    cfg_dict = seg.config.to_dict()
    del seg
    stems = [Path(s).stem for s in slides]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise ValueError(f"slides with the same name would write the same output: {', '.join(dupes)}")
    missing = [str(s) for s in slides if not Path(s).is_file()]
    if missing:
        raise SlideError(missing[0], "file not found")
    check_output(out, what="inference outputs", folder=True)
    for stem in stems:
        check_output(out / f"{stem}.tiff", what="inference output")
    out.mkdir(parents=True, exist_ok=True)
    model_abs = str(Path(model).resolve())
    if scheduler:
        client = Client(scheduler)
        cluster = None
    else:
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    try:
        futures = {}
        for s, stem in zip(slides, stems, strict=True):
            f = client.submit(_infer_task, model_abs, str(Path(s).resolve()), str((out / f"{stem}.tiff").resolve()),
                              cfg_dict, kwargs, pure=False, key=f"infer-{stem}-{os.getpid()}-{time.time_ns()}")
            futures[f] = str(s)
        results: dict[str, dict[str, Any]] = {}
        for f in as_completed(list(futures)):
            s = futures[f]
            try:
                res = f.result()
            except (SlideloopError, ValueError, OSError) as err:
                res = {"slide": s, "error": str(err)}
            results[s] = res
            if progress is not None:
                progress(res)
        return [results[str(s)] for s in slides]
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
