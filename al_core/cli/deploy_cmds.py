"""Deployment commands: export a model to ONNX, push it to the project's registry, run it over slides."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from al_core.cli._common import add_json_arg, add_project_arg, emit_json, format_table, open_project
from al_core.cli._common import model_ref as _model_ref


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``export``, ``push``, ``deployed`` and ``infer`` subcommands."""
    p = sub.add_parser("export", help="export a trained model version to ONNX (settings in its metadata)")
    add_project_arg(p)
    p.add_argument("--model", default="active", metavar="V", help="model id, 'active' (default) or 'latest'")
    p.add_argument("-o", "--output", required=True, metavar="MODEL.onnx", help="ONNX file to write")
    p.add_argument("--overlap", type=int, help="sliding-window overlap in px for inference (default: from the grid)")
    p.add_argument("--push", metavar="NAME", help="also push it to the project's deployed models under NAME")
    p.add_argument("--overwrite", action="store_true", help="with --push: replace a deployed model of that name")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--mpp", type=float, help="µm/px the model was trained at (only for a model without one)")
    scale.add_argument("--downsample", type=float,
                       help="level-0 downsample an uncalibrated model was trained at (only for a model without one)")
    add_json_arg(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("push", help="add an ONNX model to the project's deployed models (the deployment view)")
    add_project_arg(p)
    p.add_argument("model", metavar="MODEL.onnx", help="ONNX file (from 'slideloop export' or elsewhere)")
    p.add_argument("--name", help="name in the registry (default: the file name without suffix)")
    p.add_argument("--overwrite", action="store_true", help="replace a deployed model of the same name")
    p.add_argument("--config", metavar="FILE", help="settings for a model made elsewhere (no slideloop metadata): "
                                                    "JSON, TOML or a FastPathology model .txt")
    add_json_arg(p)
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("deployed", help="list the project's deployed models")
    add_project_arg(p)
    add_json_arg(p)
    p.set_defaults(func=cmd_deployed)

    p = sub.add_parser("infer", help="segment whole slides with an ONNX model into pyramidal TIFF class maps")
    p.add_argument("model", metavar="MODEL", help="ONNX file (or a deployed model's folder)")
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files to segment")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="OUT.tiff for one slide; a folder for several slides or with --scheduler")
    p.add_argument("--config", metavar="FILE", help="settings for a model made elsewhere: JSON, TOML or a "
                                                    "FastPathology model .txt (default: the model's metadata)")
    p.add_argument("--mpp", type=float, help="µm per pixel of the slide(s) where the file has none")
    p.add_argument("--batch-size", type=int, default=4, help="patches per ONNX Runtime call (default 4)")
    p.add_argument("--overlap", type=int, help="override the model's sliding-window overlap (px)")
    p.add_argument("--min-tissue", type=float, help="tissue fraction a patch needs (0 = predict every patch)")
    p.add_argument("--no-tissue-mask", action="store_true", help="keep predictions outside the tissue mask")
    p.add_argument("--probabilities", action="store_true", help="also write OUT.probabilities.tiff")
    p.add_argument("--no-geojson", action="store_true", help="do not write OUT.geojson polygons")
    p.add_argument("--compression", default="deflate", choices=("deflate", "zstd", "lzw", "none"),
                   help="TIFF compression of the class map (default deflate)")
    p.add_argument("--providers", nargs="+", metavar="EP", help="ONNX Runtime execution providers (default: best)")
    p.add_argument("--scheduler", metavar="ADDR", help="dask.distributed scheduler address (default: local)")
    p.add_argument("--workers", type=int, default=1, help="local Dask worker processes for several slides")
    add_json_arg(p)
    p.set_defaults(func=cmd_infer)


def cmd_export(args: argparse.Namespace) -> int:
    """``slideloop export``: write a model version as ONNX (optionally pushed) and report its ONNX/torch parity."""
    with open_project(args) as proj:
        res = proj.export(args.output, _model_ref(args.model), push=args.push, overwrite=args.overwrite,
                          overlap=args.overlap, mpp=args.mpp, downsample=args.downsample)
    cfg, parity, pushed = res.config, res.parity, res.deployed
    out: dict[str, Any] = {"output": args.output, "model_version": cfg.model_version,
                           "classes": [c.name for c in cfg.classes], "input_size": list(cfg.input_size),
                           "target_mpp": cfg.target_mpp, "downsample": cfg.downsample,
                           "uncalibrated": cfg.uncalibrated, "overlap": cfg.overlap,
                           "parity_max_abs_diff": None if parity is None else parity.max_abs_diff,
                           "pushed": None if pushed is None else str(pushed.path)}
    if args.json:
        emit_json(out)
    else:
        par = "not checked (no patches)" if parity is None else f"max |ORT - torch| = {parity.max_abs_diff:.2g}"
        at = f"{cfg.target_mpp:g} µm/px" if cfg.target_mpp else f"downsample {cfg.downsample:g} (uncalibrated)"
        print(f"exported model {cfg.model_version} to {args.output} ({cfg.input_size[0]} px at {at}, "
              f"{', '.join(out['classes'])}); parity: {par}")
        if pushed:
            print(f"pushed as {pushed.name} -> {pushed.path}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """``slideloop push``: add an ONNX file to the project's deployed models."""
    from al_core.deploy.registry import push_model

    m = push_model(args.project, args.model, args.name, overwrite=args.overwrite, config=args.config)
    if args.json:
        emit_json({"name": m.name, "path": str(m.path), **m.info})
    else:
        print(f"pushed {args.model} as {m.name} -> {m.path}")
    return 0


def cmd_deployed(args: argparse.Namespace) -> int:
    """``slideloop deployed``: list the project's deployed models."""
    from al_core.deploy.registry import list_deployed

    models = list_deployed(args.project)
    rows = [{"name": m.name, "pushed_at": m.info.get("pushed_at"), "path": str(m.path),
             "classes": ", ".join(c["name"] for c in (m.info.get("config") or {}).get("classes", []))}
            for m in models]
    if args.json:
        emit_json(rows)
    else:
        print(format_table(rows, ["name", "pushed_at", "classes", "path"]) if rows else "no deployed models")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    """``slideloop infer``: segment slides with an ONNX model into class-map TIFFs; exit status 1 if any failed.

    Raises ``ValueError`` when ``-o`` is neither a ``.tif``/``.tiff`` file (one slide) nor a folder."""
    from al_core.deploy.infer import infer_slide
    from al_core.deploy.many import infer_many

    kwargs: dict[str, Any] = {
        "mpp": args.mpp, "batch_size": args.batch_size, "min_tissue": args.min_tissue, "overlap": args.overlap,
        "probabilities": args.probabilities, "geojson": not args.no_geojson, "compression": args.compression,
        "mask_tissue": not args.no_tissue_mask, "providers": args.providers,
    }
    out = Path(args.output)
    is_tiff = out.suffix.lower() in (".tif", ".tiff")
    if out.suffix and not is_tiff:
        raise ValueError(f"{out}: -o must be a .tif/.tiff file (one slide) or a folder (several slides)")
    if is_tiff and (len(args.slides) > 1 or args.scheduler):
        raise ValueError(f"{out}: with several slides or --scheduler, -o names a folder for the outputs")
    if is_tiff:
        res = infer_slide(args.model, args.slides[0], out, config=args.config, **kwargs).to_dict()
        results = [res]
    else:
        results = infer_many(args.model, args.slides, out, config=args.config, scheduler=args.scheduler,
                             n_workers=args.workers, **kwargs)
    failed = [r for r in results if "error" in r]
    if args.json:
        emit_json(results)
    else:
        for r in results:
            if "error" in r:
                print(f"{r['slide']}: error: {r['error']}", file=sys.stderr)
                continue
            print(f"{r['slide']} -> {r['output']}  ({r['patches']}/{r['patches_total']} patches, "
                  f"{r['levels']} levels, {', '.join(r['providers'][:1])})")
            t = r["timings"]
            print(format_table([{k: round(v, 3) for k, v in t.items()}], list(t)))
    return 1 if failed else 0
