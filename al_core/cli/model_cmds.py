"""Model commands: train, predict, rank, metrics, rounds, tag."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from al_core.cli._common import add_json_arg, add_project_arg, emit_json, format_table, open_project
from al_core.cli._common import model_ref as _model_ref


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``train``, ``predict``, ``rank``, ``metrics``, ``rounds`` and ``tag`` subcommands."""
    p = sub.add_parser("train", help="train a U-Net on the labelled patches; stores a new model version")
    add_project_arg(p)
    p.add_argument("--from", dest="from_model", metavar="MODEL",
                   help="continue from 'latest' or a model id (weights and optimizer state)")
    p.add_argument("--encoder", help="smp encoder (default resnet18 on CPU, resnet34 on CUDA)")
    p.add_argument("--encoder-weights", choices=["imagenet", "none"],
                   help="imagenet: start from pretrained encoder weights (downloads them once); none: random init; "
                        "default: imagenet when the weights are already cached on this machine, else none")
    p.add_argument("--encoder-depth", type=int, default=5, help="encoder stages used (3–5; fewer is faster)")
    p.add_argument("--decoder-channels", type=int, nargs="+", metavar="N",
                   help="decoder widths, one per encoder stage (default 256 128 64 32 16)")
    p.add_argument("--epochs", type=int, default=20, help="epochs at most (default 20; early stopping may end sooner)")
    p.add_argument("--batch-size", type=int, default=4, help="patches per step (default 4)")
    p.add_argument("--recipe", default="default", choices=["default", "paper"],
                   help="default: CE+Dice, AdamW 1e-3 with warm-up + cosine, HED stain jitter, best val IoU; "
                        "paper: NoCodeSeg's CE, Adam 5e-5 at a constant rate, best val loss")
    p.add_argument("--lr", type=float, help="learning rate (default: the recipe's)")
    p.add_argument("--weight-decay", type=float, help="weight decay (default: the recipe's)")
    p.add_argument("--max-minutes", type=float, help="stop training after this many minutes (the schedule fits)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="labelled patches held out for validation")
    p.add_argument("--patience", type=int, default=5, help="early stop after this many epochs without improvement")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, augmentation and initialisation")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in all")
    p.add_argument("--no-augment", action="store_true", help="train without the paper's augmentation")
    p.add_argument("--class-weights", action="store_true", help="median-frequency class weights in the loss")
    _add_device_args(p)
    add_json_arg(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="predict every patch with a model version; store probabilities and scores")
    add_project_arg(p)
    p.add_argument("--model", default="active", help="model id, 'active' (default: the project's active model) or 'latest'")
    p.add_argument("--batch-size", type=int, default=8, help="patches per forward pass (default 8)")
    p.add_argument("--factor", type=int, default=4, help="store probability maps reduced by this factor")
    p.add_argument("--tta", action="store_true", help="also score flip test-time-augmentation disagreement")
    p.add_argument("--mc-dropout", type=int, default=0, metavar="N",
                   help="also score MC-dropout uncertainty from N dropout passes of the head (e.g. 8; default off)")
    _add_device_args(p)
    add_json_arg(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("rank", help="the review queue: worst-IoU labelled or most uncertain unlabelled patches")
    add_project_arg(p)
    p.add_argument("--model", default="active", help="model id, 'active' (default: the project's active model) or 'latest'")
    p.add_argument("--by", default=None, choices=["iou", "entropy", "disagreement", "mcdropout", "random"],
                   help="iou (labelled patches, default) or uncertainty/random (unlabelled patches)")
    p.add_argument("--unlabelled", action="store_true", help="rank unlabelled patches (by entropy unless --by)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--fraction", type=float, default=0.05, help="share of candidates to list (default 0.05)")
    size.add_argument("--count", type=int, help="number of patches to list")
    p.add_argument("--per-slide", action="store_true", help="take the fraction/count within each slide")
    p.add_argument("--seed", type=int, default=0, help="seed of --by random")
    p.add_argument("--csv", metavar="OUT.csv", help="also write the queue as CSV")
    add_json_arg(p)
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("metrics", help="pixel accuracy, IoU, Dice per patch → per slide → over slides")
    add_project_arg(p)
    p.add_argument("--model", default="active", help="model id, 'active' (default: the project's active model) or 'latest'")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--test-slides", nargs="+", metavar="SLIDE", help="slides of the test set")
    split.add_argument("--test-fraction", type=float, default=0.0, help="random share of slides for the test set")
    p.add_argument("--seed", type=int, default=0, help="seed of --test-fraction's draw and of the bootstrap")
    p.add_argument("--objects", nargs="*", metavar="CLASS",
                   help="also object-level metrics (AJI, F1 at IoU 0.5, object Dice/Hausdorff, bootstrap 95%% "
                        "intervals) for these instance-like classes (none named: every non-background class)")
    p.add_argument("--by-tag", metavar="KEY", help="also the figures grouped by this slide tag (see 'slideloop tag')")
    add_json_arg(p)
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("rounds", help="the active-learning history: per finished model the corrections made since "
                                      "the round before, validation IoU/Dice per class and the change")
    add_project_arg(p)
    p.add_argument("--by-slide", action="store_true",
                   help="also each round's macro IoU per slide (its stored predictions on the labelled patches)")
    add_json_arg(p)
    p.set_defaults(func=cmd_rounds)

    p = sub.add_parser("tag", help="set slide tags (stain, diagnosis…) as KEY=VALUE; empty VALUE removes a tag")
    add_project_arg(p)
    p.add_argument("slide", help="slide name")
    p.add_argument("tags", nargs="*", metavar="KEY=VALUE", help="tags to set (none: print the slide's tags)")
    add_json_arg(p)
    p.set_defaults(func=cmd_tag)


def _add_device_args(p: argparse.ArgumentParser) -> None:
    """--device and --precision, the same for training and prediction."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: AMP on CUDA, bf16 on CPUs with native bf16, else fp32")


def cmd_train(args: argparse.Namespace) -> int:
    """``slideloop train``: train a new model version, with per-epoch progress on stderr; exit status 1 unless
    it ran to the end."""
    from al_core.learn.train import Progress, TrainOptions

    opts = TrainOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                        val_fraction=args.val_fraction, patience=args.patience, seed=args.seed,
                        max_steps=args.max_steps, augment=not args.no_augment, class_weights=args.class_weights,
                        device=args.device, precision=args.precision, recipe=args.recipe,
                        max_seconds=args.max_minutes * 60 if args.max_minutes else None)

    def progress(p: Progress) -> None:
        if p.event == "epoch":
            m = p.metrics
            val = f"  val loss {m['val_loss']:.4f}  val IoU {m['val_macro_iou']:.3f}" if "val_loss" in m else ""
            print(f"epoch {p.epoch}: train loss {m['train_loss']:.4f}{val}  ({m['seconds']:.1f} s)"
                  f"{'  *' if m.get('best') else ''}", file=sys.stderr)
        elif p.event in ("start", "note"):
            print(p.message, file=sys.stderr)

    with open_project(args) as proj:
        res = proj.train(opts, from_model=_model_ref(args.from_model), encoder=args.encoder,
                         encoder_weights=args.encoder_weights, encoder_depth=args.encoder_depth,
                         decoder_channels=tuple(args.decoder_channels) if args.decoder_channels else None,
                         progress=None if args.json else progress)
    if args.json:
        emit_json(res.to_dict())
    else:
        best = res.metrics
        print(f"model {res.model_id}: {res.status}, best epoch {res.best_epoch}, "
              f"loss {best.get('val_loss', best.get('train_loss', float('nan'))):.4f}, "
              f"{res.wall_time:.1f} s on {res.device} ({res.precision}); checkpoint {res.checkpoint}")
    return 0 if res.status == "done" else 1


def cmd_predict(args: argparse.Namespace) -> int:
    """``slideloop predict``: predict every patch with a model version and store its probabilities and scores."""
    with open_project(args) as proj:
        res = proj.predict(_model_ref(args.model), batch_size=args.batch_size, factor=args.factor, tta=args.tta,
                      mc_samples=args.mc_dropout,
                      device=args.device, precision=args.precision)
    if args.json:
        emit_json(res.to_dict())
    else:
        print(f"model {res.model_id}: predicted {res.patches} patches ({res.labelled} labelled) in "
              f"{res.seconds:.1f} s on {res.device} ({res.precision}) -> {res.directory}")
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    """``slideloop rank``: print the review queue (worst-IoU labelled or most uncertain unlabelled patches),
    optionally also as CSV."""
    by = args.by or ("entropy" if args.unlabelled else "iou")
    if args.csv:
        from al_core._guards import check_output

        check_output(args.csv, what="CSV")
    with open_project(args) as proj:
        queue = proj.review_queue(_model_ref(args.model), by=by, fraction=args.fraction, count=args.count,
                             per_slide=args.per_slide, seed=args.seed)
    model_id = int(queue.attrs["model_id"])
    cols = ["rank", "patch_id", "slide", "col", "row", "x", "y", "size", "labelled", "iou", "dice", "entropy",
            "disagreement", "mcdropout"]
    queue = queue[cols]
    if args.csv:
        from al_core._io import atomic_write_bytes

        atomic_write_bytes(args.csv, queue.to_csv(index=False).encode())
    records: list[dict[str, Any]] = [
        {str(k): (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
        for r in queue.to_dict(orient="records")
    ]
    if args.json:
        emit_json({"model_id": model_id, "by": by, "queue": records})
    else:
        print(format_table(records, cols) if records else f"no candidate patches to rank by {by}")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    """``slideloop metrics``: pixel accuracy, IoU and Dice of a model version over all slides (and, with a test
    set, over its train and test slides).

    Warns on stderr when patches were relabelled after the prediction."""
    with open_project(args) as proj:
        res = proj.metrics(_model_ref(args.model), test_slides=args.test_slides,
                             test_fraction=args.test_fraction, seed=args.seed)
        if args.objects is not None:
            from al_core.learn.object_eval import object_metrics

            res["objects"] = object_metrics(proj, _model_ref(args.model), args.objects or None, seed=args.seed)
        if args.by_tag:
            from al_core.project.tags import group_by_tag, slide_tags

            res["by_tag"] = {"key": args.by_tag, "groups": group_by_tag(res["all"]["slides"], slide_tags(proj),
                                                                         args.by_tag)}
    if args.json:
        emit_json(res)
        return 0
    rows = []
    for part in ("all", "train", "test"):
        agg = res[part]
        if agg is None:
            continue
        o = agg["overall"]
        rows.append({"set": part, "slides": o["slides"], "patches": o["patches"],
                     "pixel_acc": o["pixel_accuracy"], "mean_acc": o["mean_accuracy"], "macro_iou": o["macro_iou"],
                     "weighted_iou": o["weighted_iou"],
                     **{f"dice_{n}": v for n, v in o["dice"].items()}})
    cols = list(rows[0]) if rows else []
    print(f"model {res['model_id']}  (per patch → per slide → over slides; ignore pixels excluded)")
    print(format_table(rows, cols))
    if "objects" in res:
        print(_objects_table(res["objects"]))
    if "by_tag" in res:
        tag_rows = [{args.by_tag: v, "slides": len(g["slides"]), "pixel_acc": g["pixel_accuracy"],
                     "macro_iou": g["macro_iou"], "macro_dice": g["macro_dice"]}
                    for v, g in res["by_tag"]["groups"].items()]
        print(f"by tag {args.by_tag!r} (mean over each group's slides):")
        print(format_table(tag_rows, list(tag_rows[0])))
    if res["stale_patches"]:
        print(f"note: {res['stale_patches']} patch(es) were relabelled since this prediction; "
              "run 'slideloop predict' for current figures", file=sys.stderr)
    return 0


def _objects_table(objects: dict[str, Any]) -> str:
    """One row per class and slide (then the class over slides): each metric as ``mean [low, high]``."""
    rows = []
    for name, agg in objects["classes"].items():
        for slide, v in [*agg["slides"].items(), ("(over slides)", agg["overall"])]:
            rows.append({"class": name, "slide": slide, "patches": v["patches"],
                         **{m: f"{v[m]['mean']:.3f} [{v[m]['low']:.3f}, {v[m]['high']:.3f}]"
                            for m in objects["metrics"]}})
    cols = ["class", "slide", "patches", *objects["metrics"]]
    return ("object metrics (per patch → per slide → over slides; 95% bootstrap intervals):\n"
            + (format_table(rows, cols) if rows else "no objects of the asked classes in the labelled patches"))


def cmd_rounds(args: argparse.Namespace) -> int:
    """``slideloop rounds``: one row per finished model version, oldest first (see :mod:`al_core.learn.rounds`)."""
    from al_core.learn.rounds import pending_corrections, project_rounds

    with open_project(args) as proj:
        rounds = project_rounds(proj)
        pending = pending_corrections(proj)
    if args.json:
        emit_json({"rounds": [r.to_dict() for r in rounds], "pending_corrections": pending})
        return 0
    if not rounds:
        print(f"no finished model yet ({pending} patch(es) corrected so far): train one with 'slideloop train PROJECT'")
        return 0
    classes = list(dict.fromkeys(c for r in rounds for c in r.val_iou))
    rows = [{"round": r.round, "model": r.model_id, "parent": r.parent_id, "started": r.started[:16].replace("T", " "),
             "corrections": r.corrections, "reviewed": r.reviewed, "train": r.train_patches, "val": r.val_patches,
             "val_iou": r.mean_iou, "d_iou": _signed(r.delta_iou), "val_dice": r.mean_dice,
             "d_dice": _signed(r.delta_dice),
             **{f"iou_{c}": r.val_iou.get(c) for c in classes}, **{f"dice_{c}": r.val_dice.get(c) for c in classes},
             "active": "active" if r.active else ("was" if r.promoted else "")} for r in rounds]
    print("rounds (validation: the model's best epoch on the fixed validation set; corrections: patches edited "
          "since the round before)")
    print(format_table(rows, list(rows[0])))
    print(f"since round {rounds[-1].round}: {pending} patch(es) corrected, not yet trained on")
    if args.by_slide:
        slides = sorted({n for r in rounds for n in r.slide_iou})
        if not slides:
            print("no per-slide figures: run 'slideloop predict PROJECT --model ID' for a round's model")
        else:
            print("macro IoU per slide (stored predictions on the labelled patches; '-': not predicted):")
            print(format_table([{"round": r.round, "model": r.model_id, **{n: r.slide_iou.get(n) for n in slides}}
                                for r in rounds], ["round", "model", *slides]))
    return 0


def _signed(v: float | None) -> str | None:
    return None if v is None else f"{v:+.3f}"


def cmd_tag(args: argparse.Namespace) -> int:
    """``slideloop tag``: merge KEY=VALUE tags into a slide's tags and print them."""
    from al_core.project.tags import parse_tags, set_tags

    tags = parse_tags(args.tags)
    with open_project(args) as proj:
        now = set_tags(proj, args.slide, tags)
    if args.json:
        emit_json({"slide": args.slide, "tags": now})
    else:
        print(f"{args.slide}: " + (", ".join(f"{k}={v}" for k, v in now.items()) or "no tags"))
    return 0
