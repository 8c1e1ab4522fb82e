"""The project's fixed validation set: slide regions held out of training in every round, so that two model
versions are scored on the same patches.

The set only grows, and only with newly labelled patches: a patch labelled since the last training run joins
it with probability ``val_fraction`` (a seeded draw); a patch once trained on never moves to validation, and a
validation patch never moves to training. Regions (slide, x, y, size), not patch ids, are stored, so the set
survives a rebuilt grid. Both lists live in the ``meta`` table and change inside the write transaction that
reads them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session

from al_core.project.patches import covered_by
from al_core.project.schema import Meta, PatchRow
from al_core.project.store import Store

#: ``meta`` key: the validation regions, JSON ``[[slide_id, x, y, size], ...]``
VALIDATION_KEY = "validation_set"
#: ``meta`` key: every region a training run has used (train or validation), to tell newly labelled patches
SEEN_KEY = "validation_seen"

Region = tuple[int, int, int, int]


@dataclass(frozen=True)
class Split:
    """Positions (into the labelled patches given) of the training and validation patches, and how many of the
    validation patches joined the set in this run."""

    train: list[int]
    val: list[int]
    added: int


def region_of(p: PatchRow) -> Region:
    """A patch's slide region."""
    return (p.slide_id, p.x, p.y, p.size)


def _load(session: Session, key: str) -> list[Region]:
    row = session.get(Meta, key)
    return [(int(a), int(b), int(c), int(d)) for a, b, c, d in json.loads(row.value)] if row else []


def validation_regions(store: Store) -> list[Region]:
    """The stored validation set."""
    with store.read() as s:
        return _load(s, VALIDATION_KEY)


def _covered(patches: Sequence[PatchRow], regions: Sequence[Region]) -> set[int]:
    out: set[int] = set()
    for sid in {p.slide_id for p in patches}:
        mine = [p for p in patches if p.slide_id == sid]
        out |= covered_by(mine, [(x, y, size) for i, x, y, size in regions if i == sid])
    return out


def fixed_split(store: Store, labelled: Sequence[PatchRow], val_fraction: float, seed: int | None) -> Split:
    """Split ``labelled`` into training and validation by the stored set, growing it with newly labelled
    patches; the grown set is stored before this returns."""
    with store.write() as s:
        val_regions, seen = _load(s, VALIDATION_KEY), _load(s, SEEN_KEY)
        in_val = _covered(labelled, val_regions)
        known = _covered(labelled, seen) | in_val
        new = [i for i, p in enumerate(labelled) if p.id not in known]
        n_new = int(round(val_fraction * len(new)))
        if val_fraction > 0 and not val_regions and len(labelled) >= 2:
            n_new = min(max(n_new, 1), len(new) - 1)  # a first run keeps at least one of each, like a plain split
        drawn = set(np.random.default_rng(seed).permutation(len(new))[:max(n_new, 0)].tolist())
        joined = [new[k] for k in sorted(drawn)]
        val = sorted({i for i, p in enumerate(labelled) if p.id in in_val} | set(joined))
        train = [i for i in range(len(labelled)) if i not in set(val)]
        store.set_meta(s, VALIDATION_KEY, [list(r) for r in val_regions + [region_of(labelled[i]) for i in joined]])
        old_seen = set(seen)
        store.set_meta(s, SEEN_KEY, [list(r) for r in seen + [region_of(p) for p in labelled
                                                             if region_of(p) not in old_seen]])
    return Split(train, val, len(joined))
