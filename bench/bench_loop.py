"""Loop turnaround: from "save correction" to "queue re-ranked with the new model", through the app's path.

The bundled sample as ``slideloop demo`` grids it (256 px patches, its pre-annotation as labels), the app's own
Dask scheduler + worker (``al_core.cli.job_cluster``), the training panel's service and defaults
(:class:`slideloop_apps.training.TrainSettings`: resnet18 on the CPU), and the review app's state. Each round:
save a correction (:meth:`AppState.save`), submit a train job (round 1: a new model; later rounds: from the
previous model), poll the job row as the panel does (every second), then :meth:`AppState.use_model` re-ranks
the queue. Round 1 also pays the worker's first ``import torch``. Timings, not assertions.

    python bench/bench_loop.py                       # the panel's CPU defaults, 2 rounds
    python bench/bench_loop.py --epochs 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from _util import print_table  # bench/ runs as a script folder
from shapely.geometry import box
from slideloop_apps.state import AppState
from slideloop_apps.training import NEW_MODEL_EPOCHS, RETRAIN_EPOCHS, TrainingService, TrainSettings

from al_core.cli.app_cmds import build_demo
from al_core.cli.job_cluster import job_cluster
from al_core.learn import rank
from al_core.project.jobs import SCHEDULER_ENV
from al_core.project.project import Project
from al_core.project.schema import JobRow, ModelRow

POLL_S = 1.0  # the training panel's poll interval


def one_round(state: AppState, service: TrainingService, settings: TrainSettings, n: int) -> dict[str, object]:
    """One correction → retrain → predict → re-rank round; seconds per stage."""
    patch = state.queue[n]  # a different patch each round
    state.select_patch(patch.patch_id)
    s = patch.size
    state.pending = [(1, box(patch.x + s * 0.3, patch.y + s * 0.3, patch.x + s * 0.6, patch.y + s * 0.7))]
    t0 = time.perf_counter()
    state.save()
    t_saved, w_saved = time.perf_counter(), time.time()
    job_id = service.start(settings)
    while True:  # what the panel's poll thread does
        with state.project.store.read() as sess:
            job = sess.get(JobRow, job_id)
        assert job is not None
        if job.status not in ("queued", "running"):
            break
        time.sleep(POLL_S)
    w_seen = time.time()
    if job.status != "done":
        raise SystemExit(f"job {job_id} {job.status}: {job.error}")
    result = json.loads(job.result)
    model_id = int(result["model_id"])
    with state.project.store.read() as sess:
        model = sess.get(ModelRow, model_id)
        assert model is not None
        train_s = float(model.wall_time or 0.0)
    predict_s = float(result["predict"]["seconds"])
    tr = time.perf_counter()
    for by in ("iou", "entropy"):  # what AppState ranks with, timed on its own
        rank.review_queue(state.project, model_id, by=by, fraction=1.0)
    rank_s = time.perf_counter() - tr
    tu = time.perf_counter()
    state.use_model(model_id)  # ranks again and rebuilds the queue, bumps the overlay
    t_end = time.perf_counter()
    assert state.has_predictions and state.queue[0].iou is not None
    job_s = job.finished - job.started
    return {"round": n + 1, "from": settings.from_model or "new", "epochs": settings.epochs, "save": t_saved - t0,
            "submit": job.submitted - w_saved, "queue+start": job.started - job.submitted, "train": train_s,
            "predict": predict_s, "job other": job_s - train_s - predict_s, "poll": w_seen - job.finished,
            "rank": rank_s, "refresh": (t_end - tu) - rank_s, "total": t_end - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--encoder", default=TrainSettings.encoder)
    ap.add_argument("--epochs", type=int, default=None,
                    help=f"default: the panel's ({NEW_MODEL_EPOCHS} for a new model, {RETRAIN_EPOCHS} from a model)")
    ap.add_argument("--batch", type=int, default=TrainSettings.batch_size)
    ap.add_argument("--lr", type=float, default=TrainSettings.lr)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="slideloop-bench-loop-"))
    root = build_demo(work / "proj")
    rows = []
    with job_cluster(work / "dask") as scheduler:
        os.environ[SCHEDULER_ENV] = scheduler
        with Project.open(root) as proj:
            state = AppState(proj, author="bench")
            service = TrainingService(proj, author="bench")
            labelled = len(proj.labelled_patch_ids())
            print(f"sample: {len(proj.patches())} patches of {proj.grid_spec().patch} px, {labelled} labelled; "
                  f"{args.encoder}, batch {args.batch}, lr {args.lr}; "
                  f"{os.cpu_count()} CPU(s)", flush=True)
            previous = None
            for n in range(args.rounds):
                epochs = args.epochs or (NEW_MODEL_EPOCHS if previous is None else RETRAIN_EPOCHS)
                settings = TrainSettings(encoder=args.encoder, epochs=epochs, batch_size=args.batch,
                                         lr=args.lr, from_model=previous)
                row = one_round(state, service, settings, n)
                rows.append(row)
                previous = state.model_id
                print(f"round {n + 1}: {row['total']:.1f} s", flush=True)
            service.close()
    print_table(rows, "loop turnaround, seconds (save correction → queue re-ranked with the new model)")


if __name__ == "__main__":
    main()
