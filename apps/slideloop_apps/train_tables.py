"""The Train tab's tables as HTML: the rounds of the active-learning history and a model's object metrics.

Pure functions of what :mod:`al_core.learn.rounds` and :mod:`al_core.learn.object_eval` return; the panel
(:mod:`slideloop_apps.train_panel`) puts the HTML in its widgets.
"""

from __future__ import annotations

import html
from typing import Any

from slideloop_apps.ui import message_html

#: how many rounds the per-slide table shows (the newest; the CLI's ``rounds --by-slide`` has them all)
SLIDE_ROUNDS = 6


def instance_classes(project: Any) -> list[str]:
    """The classes object metrics can score: every trained class but the background."""
    return [c.name for c in project.classes() if c.idx != 0 and not c.ignore]


def rounds_html(rounds: list[Any], pending: int = 0) -> str:
    """The Rounds section: per round the corrections, the model, mean and per-class validation IoU/Dice with the
    change against the round before, then per-slide IoU of the newest rounds; ``pending``: patches corrected
    since the newest round started."""
    if not rounds:
        return "<div style='color:#555'>No finished model yet: the first training run is round 1.</div>"
    classes = list(dict.fromkeys(c for r in rounds for c in r.val_iou))
    head = ("<tr><th>round</th><th>model</th><th style='text-align:left'>trained</th><th>corrections</th>"
            "<th>reviewed</th><th>train / val</th><th>val IoU</th><th>change</th><th>val Dice</th><th>change</th>"
            + "".join(f"<th>{html.escape(c)} IoU</th><th>{html.escape(c)} Dice</th>" for c in classes)
            + "<th style='text-align:left'>became</th></tr>")
    body = []
    for r in reversed(rounds):
        became = "◀ active" if r.active else ("was active" if r.promoted else "kept back")
        body.append(
            f"<tr class='{'active' if r.active else ''}' data-round='{r.round}' data-model='{r.model_id}'>"
            f"<td>{r.round}</td><td>{r.model_id}</td><td style='text-align:left'>{html.escape(_when(r.started))}</td>"
            f"<td>{r.corrections}</td><td>{r.reviewed}</td><td>{r.train_patches} / {r.val_patches}</td>"
            f"<td>{num(r.mean_iou)}</td>{_arrow(r.delta_iou)}<td>{num(r.mean_dice)}</td>{_arrow(r.delta_dice)}"
            + "".join(f"<td>{num(r.val_iou.get(c))}</td><td>{num(r.val_dice.get(c))}</td>" for c in classes)
            + f"<td style='text-align:left'>{became}</td></tr>")
    note = ("<div style='color:#555;font-size:12px;margin:2px 0 6px'>Corrections: patches whose labels were "
            "edited since the round before. Validation: the model's best epoch on the project's fixed validation "
            "set (it grows as patches are labelled).</div>")
    waiting = (f"<div class='slideloop-rounds-pending' style='font-size:12px;margin:4px 0'>Since round "
               f"{rounds[-1].round}: {pending} patch{'es' if pending != 1 else ''} corrected, not yet trained on."
               "</div>")
    out = f"{note}<table class='slideloop-rounds-table'>{head}{''.join(body)}</table>{waiting}"
    shown = [r for r in rounds if r.slide_iou][-SLIDE_ROUNDS:]
    slides = sorted({n for r in shown for n in r.slide_iou})
    if slides:
        shead = "<tr><th style='text-align:left'>slide IoU</th>" + "".join(
            f"<th>round {r.round}</th>" for r in shown) + "</tr>"
        srows = "".join(f"<tr><td style='text-align:left'>{html.escape(n)}</td>"
                        + "".join(f"<td>{num(r.slide_iou.get(n))}</td>" for r in shown) + "</tr>" for n in slides)
        out += ("<div style='color:#555;font-size:12px;margin:8px 0 2px'>Macro IoU per slide on its labelled "
                f"patches (the round's predictions):</div><table class='slideloop-slides-table'>{shead}{srows}</table>")
    return out


#: object metric columns: (key, title); Hausdorff is a distance (lower is better), in patch pixels
_OBJECT_COLUMNS = (("aji", "AJI"), ("f1", "object F1 @0.5"), ("object_dice", "object Dice"),
                   ("object_hausdorff", "object Hausdorff (px)"))


def objects_html(res: dict[str, Any]) -> str:
    """Object metrics of one model (:func:`al_core.learn.object_eval.object_metrics`): per class, its slides and the
    figure over slides, each ``mean [95 % interval]``."""
    head = ("<tr><th style='text-align:left'>class</th><th style='text-align:left'>slide</th><th>patches</th>"
            "<th>objects (label / model)</th>" + "".join(f"<th>{t}</th>" for _, t in _OBJECT_COLUMNS) + "</tr>")
    rows = []
    for name, agg in res["classes"].items():
        # one slide: its row is the overall figure already
        extra = [("all slides", agg["overall"])] if len(agg["slides"]) > 1 else []
        for slide, v in [*agg["slides"].items(), *extra]:
            objects = (f"{v['objects_label']} / {v['objects_pred']}" if "objects_label" in v else "")
            weight = " style='font-weight:600'" if slide == "all slides" else ""
            rows.append(f"<tr{weight}><td style='text-align:left'>{html.escape(name)}</td>"
                        f"<td style='text-align:left'>{html.escape(slide)}</td><td>{v['patches']}</td>"
                        f"<td>{objects}</td>" + "".join(
                            f"<td>{num(v[k]['mean'], 2 if k == 'object_hausdorff' else 3)} <span class='ci'>"
                            f"[{num(v[k]['low'], 2 if k == 'object_hausdorff' else 3)}, "
                            f"{num(v[k]['high'], 2 if k == 'object_hausdorff' else 3)}]</span></td>"
                            for k, _ in _OBJECT_COLUMNS) + "</tr>")
    if not rows:
        return message_html(f"Model {res['model_id']}: no objects of these classes in the labelled patches.")
    return (f"<div style='color:#555;font-size:12px;margin:2px 0 6px'>Model {res['model_id']} on the labelled "
            "patches, per patch → per slide → over slides; in brackets the bootstrap 95 % interval.</div>"
            f"<table>{head}{''.join(rows)}</table>")


def _when(stamp: str) -> str:
    return stamp[:16].replace("T", " ")


def _arrow(d: float | None) -> str:
    if d is None:
        return "<td class='same'>—</td>"
    if abs(d) < 5e-4:
        return f"<td class='same'>= {d:+.3f}</td>"
    return f"<td class='up'>▲ {d:+.3f}</td>" if d > 0 else f"<td class='down'>▼ {d:+.3f}</td>"


def num(value: Any, digits: int = 3) -> str:
    """A figure for a table cell: ``digits`` decimals, a dash for none, other values escaped."""
    if value is None:
        return "—"
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return html.escape(str(value))
