"""The fixed validation set: it grows only with newly labelled patches, never trades patches with training,
and survives a rebuilt grid (regions, not patch ids)."""

from __future__ import annotations

from _engine import make_project
from shapely.geometry import box

from al_core.project.validation import fixed_split, region_of, validation_regions
from al_core.wsi.grid import GridSpec


def _labelled(proj):
    ids = proj.labelled_patch_ids()
    return [p for p in proj.patches() if p.id in ids]


def test_validation_set_is_fixed_and_grows_only_with_new_patches(tmp_path, sample_svs, sample_geojson):
    with make_project(tmp_path / "proj", sample_svs, sample_geojson) as proj:
        first = _labelled(proj)
        s1 = fixed_split(proj.store, first, 0.2, seed=0)
        assert s1.val and s1.train and s1.added == len(s1.val) == round(0.2 * len(first))
        val1 = {region_of(first[i]) for i in s1.val}
        train1 = {region_of(first[i]) for i in s1.train}
        assert set(validation_regions(proj.store)) == val1
        # the same labels again, another seed: nothing new, so the same split
        again = fixed_split(proj.store, first, 0.2, seed=7)
        assert again.added == 0 and {region_of(first[i]) for i in again.val} == val1
        # label some patches no label touched: only they can join, the old set stays whole
        unlabelled = [p for p in proj.patches() if p.id not in {q.id for q in first}][:5]
        assert len(unlabelled) == 5
        for p in unlabelled:
            proj.correct(p.slide_id, box(p.x, p.y, p.x + p.size // 2, p.y + p.size // 2), 1, patch_id=p.id)
        second = _labelled(proj)
        s2 = fixed_split(proj.store, second, 0.4, seed=0)  # 2 of the 5 new
        val2 = {region_of(second[i]) for i in s2.val}
        assert val1 <= val2 and s2.added == len(val2 - val1) == 2
        assert (val2 - val1) <= {region_of(p) for p in unlabelled}
        assert not (val2 & train1)  # a patch once trained on never becomes validation
        # a rebuilt grid of the same spec: the same regions are found again
        proj.build_grid(GridSpec(patch=128, overlap=0))
        rebuilt = _labelled(proj)
        s3 = fixed_split(proj.store, rebuilt, 0.2, seed=3)
        assert s3.added == 0 and {region_of(rebuilt[i]) for i in s3.val} == val2
