"""Slide tags (stain, diagnosis, scanner…): free-form ``key=value`` strings per slide, and metrics grouped by them.

Tags let a pathologist ask whether the model is as good on, say, the IHC slides as on the H&E ones (the seed's
per-stain figure). They live in the slide row as a JSON object; an empty value removes a key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from al_core.errors import ProjectError
from al_core.project.schema import SlideRow

if TYPE_CHECKING:
    from al_core.project.project import Project

#: the group of slides without the asked tag
UNTAGGED = "(untagged)"


def parse_tags(items: list[str]) -> dict[str, str]:
    """``["stain=HE", "dx="]`` → ``{"stain": "HE", "dx": ""}``; anything without ``=`` is an error."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"a tag is KEY=VALUE (empty VALUE removes it), got {item!r}")
        out[key.strip()] = value.strip()
    return out


def set_tags(project: Project, slide: str, tags: Mapping[str, str]) -> dict[str, str]:
    """Merge ``tags`` into a slide's tags (empty values remove keys); returns the slide's tags after."""
    with project.store.write() as s:
        row = s.query(SlideRow).filter(SlideRow.name == slide).one_or_none()
        if row is None:
            names = [n for (n,) in s.query(SlideRow.name).all()]
            raise ProjectError(f"{project.root}: no slide {slide!r} (slides: {', '.join(names) or 'none'})")
        current: dict[str, str] = json.loads(row.tags or "{}")
        current.update(tags)
        current = {k: v for k, v in current.items() if v}
        row.tags = json.dumps(current, sort_keys=True)
        return current


def slide_tags(project: Project) -> dict[str, dict[str, str]]:
    """Every slide's tags by slide name (``{}`` for an untagged slide)."""
    return {s.name: json.loads(s.tags or "{}") for s in project.slides()}


def group_by_tag(slides: Mapping[str, Mapping[str, Any]], tags: Mapping[str, Mapping[str, str]], key: str,
                 fields: tuple[str, ...] = ("pixel_accuracy", "macro_iou", "macro_dice")) -> dict[str, dict[str, Any]]:
    """Per value of tag ``key``: the mean over its slides of each per-slide figure in ``fields`` (NaN-aware),
    and the slides it holds; slides without the tag form :data:`UNTAGGED`."""
    groups: dict[str, list[str]] = {}
    for name in slides:
        groups.setdefault(tags.get(name, {}).get(key, UNTAGGED), []).append(name)
    out: dict[str, dict[str, Any]] = {}
    for value, names in sorted(groups.items()):
        row: dict[str, Any] = {"slides": sorted(names)}
        for f in fields:
            v = np.asarray([slides[n][f] for n in names], dtype=np.float64)
            row[f] = float(np.nanmean(v)) if (~np.isnan(v)).any() else float("nan")
        out[value] = row
    return out
