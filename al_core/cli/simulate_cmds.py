"""``slideloop simulate``: which review strategy needs the fewest corrections, on a fully labelled project."""

from __future__ import annotations

import argparse
from pathlib import Path

from al_core.cli._common import add_json_arg, add_project_arg, emit_json, format_table, open_project


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``simulate`` subcommand."""
    p = sub.add_parser("simulate", help="strategy study: corrupt complete labels, then rounds of train → rank → "
                                        "reveal the truth; table and plot of test IoU/Dice vs corrections")
    add_project_arg(p)
    p.add_argument("--out", required=True, metavar="DIR", help="folder for simulate.csv, simulate_summary.csv, "
                                                                "simulate.png")
    p.add_argument("--strategies", nargs="+", default=["iou", "entropy", "random"],
                   choices=["iou", "entropy", "disagreement", "mcdropout", "random"],
                   help="review strategies to compare (default: iou entropy random)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="seeds, one full study each; bands are 95 %% intervals over them (default 0 1 2)")
    p.add_argument("--rounds", type=int, default=3, help="correction rounds after round 0 (default 3)")
    p.add_argument("--budget", type=int, default=8, help="patches corrected per round (default 8)")
    p.add_argument("--drop", type=float, default=0.3, help="share of objects the pre-annotation misses")
    p.add_argument("--morph", type=float, default=2.0, help="objects eroded/dilated by up to this many patch px")
    p.add_argument("--shift", type=float, default=2.0, help="objects shifted by up to this many patch px")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--test-slides", nargs="+", metavar="SLIDE", help="held-out slides (never trained on)")
    split.add_argument("--test-fraction", type=float, default=0.2, help="random share of slides held out")
    p.add_argument("--mc-samples", type=int, default=8, help="dropout passes for the mcdropout strategy")
    p.add_argument("--no-reference", action="store_true", help="skip the all-labels reference run")
    p.add_argument("--epochs", type=int, default=20, help="epochs per training round at most")
    p.add_argument("--max-steps", type=int, help="optimizer steps per training round at most")
    p.add_argument("--batch-size", type=int, default=4, help="training batch size (default 4)")
    p.add_argument("--recipe", default="default", choices=["default", "paper"],
                   help="training recipe: default (CE+Dice, AdamW warm-up+cosine) or paper (Adam 5e-5)")
    p.add_argument("--lr", type=float, help="learning rate (default: the recipe's)")
    p.add_argument("--encoder", help="smp encoder (default resnet18 on CPU, resnet34 on CUDA)")
    p.add_argument("--encoder-depth", type=int, default=5, help="encoder stages (default 5)")
    p.add_argument("--decoder-channels", type=int, nargs="+", metavar="N",
                   help="decoder channels per stage (default: smp's)")
    add_json_arg(p)
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run the study; print the summary and how many corrections each strategy needed to reach all labels."""
    import sys

    from al_core.learn.corrupt import Corruption
    from al_core.learn.simulate import REFERENCE, SimulateSettings, corrections_to_reach, simulate, summarise
    from al_core.learn.train import TrainOptions

    arch = {"encoder": args.encoder, "encoder_depth": args.encoder_depth,
            "decoder_channels": tuple(args.decoder_channels) if args.decoder_channels else None}
    settings = SimulateSettings(
        strategies=tuple(args.strategies), seeds=tuple(args.seeds), rounds=args.rounds, budget=args.budget,
        corruption=Corruption(args.drop, args.morph, args.shift),
        test_slides=tuple(args.test_slides) if args.test_slides else None, test_fraction=args.test_fraction,
        options=TrainOptions(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                             recipe=args.recipe, lr=args.lr),
        arch=arch, mc_samples=args.mc_samples, reference=not args.no_reference)
    with open_project(args) as proj:
        table = simulate(proj, settings, args.out, log=lambda m: print(m, file=sys.stderr))
    summary = summarise(table)
    ref = summary[summary["strategy"] == REFERENCE]
    reach = corrections_to_reach(summary, float(ref["test_iou"].iloc[0])) if len(ref) else {}
    out = Path(args.out)
    if args.json:
        emit_json({"summary": summary.to_dict(orient="records"), "corrections_to_reference": reach,
                   "files": [str(out / f) for f in ("simulate.csv", "simulate_summary.csv", "simulate.png")]})
        return 0
    cols = ["strategy", "round", "seeds", "corrections", "test_iou", "test_iou_low", "test_iou_high", "test_dice"]
    print(format_table([{str(k): v for k, v in r.items()} for r in summary[cols].to_dict(orient="records")], cols))
    if reach:
        print(f"corrections to reach the {REFERENCE} IoU ({float(ref['test_iou'].iloc[0]):.3f}): "
              + ", ".join(f"{k} {'never' if v is None else f'{v:g}'}" for k, v in reach.items()))
    print(f"table, summary and plot in {out}")
    return 0
