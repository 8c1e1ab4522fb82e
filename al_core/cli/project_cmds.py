"""Project commands: init, add, grid, labels import/export, status."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from al_core.cli._common import add_json_arg, add_project_arg, emit_json, format_table, open_project
from al_core.errors import NoTissueError
from al_core.project.classes import DEFAULT_CLASSES


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``init``, ``add``, ``grid``, ``labels`` and ``status`` subcommands."""
    p = sub.add_parser("init", help="create a project (SQLite) with its class list")
    add_project_arg(p)
    p.add_argument("--classes", nargs="+", metavar="NAME:#RRGGBB", default=list(DEFAULT_CLASSES),
                   help="label classes (Background is implicit, index 0); append ':ignore' for a class whose "
                        f"pixels no loss or metric counts (default: {' '.join(DEFAULT_CLASSES)})")
    add_json_arg(p)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("add", help="register slides")
    add_project_arg(p)
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files (SVS, NDPI, TIFF/OME-TIFF, PNG/JPEG)")
    p.add_argument("--mpp", type=float, help="µm per pixel where the file has none (overrides the file's)")
    p.add_argument("--name", help="slide name (default: file name without suffix); only with one slide")
    add_json_arg(p)
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("grid", help="cut the tissue patch grid (NoCodeSeg defaults)")
    add_project_arg(p)
    p.add_argument("--patch", type=int, default=512, help="patch size in output pixels (default 512)")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--downsample", type=float, help="read this many times down from level 0")
    scale.add_argument("--mpp", "--target-mpp", dest="target_mpp", type=float,
                       help="µm per output pixel (default 1.0 = 40x read 4x down); slides without µm/px "
                            "(uncalibrated) need --downsample")
    p.add_argument("--overlap", type=int, help="overlap in output pixels (default: a quarter of the patch, 128 of 512)")
    p.add_argument("--min-tissue", type=float, default=0.25, help="drop patches under this tissue fraction")
    add_json_arg(p)
    p.set_defaults(func=cmd_grid)

    labels = sub.add_parser("labels", help="import or export label geometry")
    lsub = labels.add_subparsers(dest="labels_command", metavar="ACTION", required=True)
    p = lsub.add_parser("import", help="QuPath GeoJSON, a mask-tile folder (Images/ + Labels/), or a label image")
    add_project_arg(p)
    p.add_argument("files", nargs="+", metavar="FILE", help="GeoJSON file(s), a tile-export folder or a label image")
    p.add_argument("--slide", help="slide name (default: from the file name)")
    p.add_argument("--author", default="import", help="author recorded on the label version (default import)")
    add_json_arg(p)
    p.set_defaults(func=cmd_labels_import)
    p = lsub.add_parser("preannotate", help="rough first-pass labels from a hematoxylin threshold (to correct)")
    add_project_arg(p)
    p.add_argument("--slide", help="slide name (default: every slide without labels)")
    p.add_argument("--class", dest="class_name", help="class to label (default: the first non-background class)")
    add_json_arg(p)
    p.set_defaults(func=cmd_labels_preannotate)
    p = lsub.add_parser("export", help="write current labels as QuPath GeoJSON")
    add_project_arg(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT.geojson", help="GeoJSON file to write")
    p.add_argument("--slide", help="only this slide (default: every slide)")
    add_json_arg(p)
    p.set_defaults(func=cmd_labels_export)

    p = sub.add_parser("status", help="slides, patches, tissue, labelled/unlabelled counts")
    add_project_arg(p)
    p.add_argument("--check", action="store_true", help="first check every page of the database (integrity_check)")
    add_json_arg(p)
    p.set_defaults(func=cmd_status)


def cmd_init(args: argparse.Namespace) -> int:
    """``slideloop init``: create a project with its class list."""
    from al_core.project.project import Project

    with Project.create(args.project, args.classes) as proj:
        classes = [c.__dict__ for c in proj.classes()]
    if args.json:
        emit_json({"project": args.project, "classes": classes})
    else:
        print(f"created project {args.project} with classes: " + ", ".join(c["name"] for c in classes))
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    """``slideloop add``: register slide files and print their size, levels, µm/px and tissue fraction."""
    if args.name and len(args.slides) > 1:
        raise ValueError("--name names one slide; give one SLIDE with it")
    added = []
    with open_project(args) as proj:
        for path in args.slides:
            row = proj.add_slide(path, mpp=args.mpp, name=args.name)
            added.append({"id": row.id, "name": row.name, "width": row.width, "height": row.height,
                          "levels": row.levels, "mpp": row.mpp, "calibrated": row.mpp is not None, "tissue_fraction": round(row.tissue_fraction or 0, 4)})
    if args.json:
        emit_json(added)
    else:
        print(format_table(added, ["id", "name", "width", "height", "levels", "mpp", "tissue_fraction"]))
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    """``slideloop grid``: cut the tissue patch grid of every slide and print the patches per slide."""
    from al_core.wsi.grid import GridSpec

    spec = GridSpec(patch=args.patch, overlap=args.overlap, min_tissue=args.min_tissue,
                    target_mpp=args.target_mpp, downsample=args.downsample)
    with open_project(args) as proj:
        grid_id = proj.build_grid(spec)
        spec = proj.grid_spec() or spec
        status = proj.status()
    rows = [{"slide": s["name"], "patches": s["patches"], "tissue_fraction": s["tissue_fraction"]}
            for s in status["slides"]]
    if args.json:
        emit_json({"grid_id": grid_id, "spec": spec.to_dict(), "slides": rows,
                   "no_tissue": [r["slide"] for r in rows if not r["patches"]]})
    else:
        print(format_table(rows, ["slide", "patches", "tissue_fraction"]))
        print(f"grid {grid_id}: {sum(r['patches'] for r in rows)} patches of {spec.patch} px, overlap {spec.overlap}")
    return 0


def cmd_labels_import(args: argparse.Namespace) -> int:
    """``slideloop labels import``: import each file's label geometry as a new label version of its slide."""
    results = []
    with open_project(args) as proj:
        for f in args.files:
            res = proj.import_labels(f, slide=args.slide, author=args.author)
            results.append({"file": f, "slide": res.slide, "version": res.version, "shapes": res.shapes,
                            "notes": list(res.notes)})
    if args.json:
        emit_json(results)
    else:
        for r in results:
            print(f"{r['file']}: {r['shapes']} shape(s) -> slide {r['slide']} label version {r['version']}")
            for n in r["notes"]:
                print(f"  note: {n}", file=sys.stderr)
    return 0


def cmd_labels_preannotate(args: argparse.Namespace) -> int:
    """``slideloop labels preannotate``: a hematoxylin-threshold first-pass label version of one slide, or of
    every slide never labelled.

    Raises ``ValueError`` for an unknown ``--class``."""
    results: list[dict[str, Any]] = []
    with open_project(args) as proj:
        classes = [c for c in proj.classes() if c.idx != 0 and not c.ignore]
        if args.class_name:
            classes = [c for c in classes if c.name.lower() == args.class_name.lower()]
            if not classes:
                raise ValueError(f"unknown class {args.class_name!r}")
        cls = classes[0]
        rows = [proj.slide_row(args.slide)] if args.slide else [
            r for r in proj.slides() if proj.label_version(r.id) == 0]
        for row in rows:
            try:
                version, share = proj.preannotate(row, cls.idx)
            except NoTissueError as err:  # the other slides still get theirs; this one is no success
                results.append({"slide": row.name, "class": cls.name, "error": str(err)})
                continue
            results.append({"slide": row.name, "class": cls.name, "version": version,
                            "area_fraction": round(share, 4)})
    if args.json:
        emit_json(results)
    else:
        for r in results:
            if "error" in r:
                print(f"slideloop labels preannotate: error: {r['error']}", file=sys.stderr)
                continue
            print(f"{r['slide']}: {r['class']} pre-annotation over {r['area_fraction']:.1%} of the slide "
                  f"(label version {r['version']}; uncorrected — review it)")
    return 1 if any("error" in r for r in results) else 0


def cmd_labels_export(args: argparse.Namespace) -> int:
    """``slideloop labels export``: write a slide's current labels as QuPath GeoJSON (``--slide`` is needed
    when the project has several)."""
    with open_project(args) as proj:
        n = proj.export_labels(args.output, slide=args.slide)
    if args.json:
        emit_json({"output": args.output, "features": n})
    else:
        print(f"wrote {n} feature(s) to {args.output}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """``slideloop status``: the project's classes, grid and per-slide patch and label counts.

    Names slides whose files are missing on stderr."""
    with open_project(args) as proj:
        if args.check:
            proj.store.check(full=True)
            print(f"database {proj.store.source}: integrity_check ok", file=sys.stderr)
        st = proj.status()
    if args.json:
        emit_json(st)
        return 0
    print(f"project {st['project']}  classes: " + ", ".join(
        f"{c['idx']}={c['name']}{' (ignore)' if c['ignore'] else ''}" for c in st["classes"]))
    g = st["grid"]
    print("grid: " + ("not built (run 'slideloop grid')" if g is None else
                      f"patch {g['patch']} px, overlap {g['overlap']}, min tissue {g['min_tissue']}, "
                      + (f"target {g['target_mpp']} µm/px" if g["target_mpp"] else
                         f"downsample {g['downsample']}" if g["downsample"] else "default scale")))
    for s in st["slides"]:
        s["scale"] = f"{s['mpp']:.4g} µm/px" if s["calibrated"] else "uncalibrated"
    cols = ["name", "width", "height", "levels", "scale", "tissue_fraction", "patches", "labelled", "unlabelled",
            "label_version"]
    print(format_table(st["slides"], cols))
    missing = [s["name"] for s in st["slides"] if not s["file_present"]]
    if missing:
        print("missing slide files: " + ", ".join(missing), file=sys.stderr)
    t = st["totals"]
    print(f"total: {t['slides']} slide(s), {t['patches']} patches, {t['labelled']} labelled, {t['unlabelled']} unlabelled")
    return 0
