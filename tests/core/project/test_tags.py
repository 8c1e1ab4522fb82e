"""Slide tags (al_core.project.tags): parsing, merging on a real project, metrics grouped by a tag."""

from __future__ import annotations

import math

import pytest

from al_core.errors import ProjectError
from al_core.project.project import Project
from al_core.project.tags import UNTAGGED, group_by_tag, parse_tags, set_tags, slide_tags


def test_parse_tags():
    assert parse_tags(["stain=HE", " dx = tumour ", "scanner="]) == {"stain": "HE", "dx": "tumour", "scanner": ""}
    for bad in (["stain"], ["=HE"]):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            parse_tags(bad)


def test_tags_merge_and_remove(tmp_path, sample_svs):
    with Project.create(tmp_path / "p") as proj:
        proj.add_slide(sample_svs)
        assert slide_tags(proj) == {"CMU-1-Small-Region": {}}
        assert set_tags(proj, "CMU-1-Small-Region", {"stain": "HE", "dx": "skin"}) == {"dx": "skin", "stain": "HE"}
        assert set_tags(proj, "CMU-1-Small-Region", {"dx": ""}) == {"stain": "HE"}
        with pytest.raises(ProjectError, match="no slide 'other'.*CMU-1-Small-Region"):
            set_tags(proj, "other", {"stain": "IHC"})
    with Project.open(tmp_path / "p") as proj:  # stored, not cached
        assert slide_tags(proj) == {"CMU-1-Small-Region": {"stain": "HE"}}


def test_group_by_tag_means_over_slides():
    slides = {"a": {"macro_iou": 0.2, "macro_dice": 0.3, "pixel_accuracy": 0.9},
              "b": {"macro_iou": 0.4, "macro_dice": float("nan"), "pixel_accuracy": 0.7},
              "c": {"macro_iou": 0.8, "macro_dice": 0.8, "pixel_accuracy": 0.5}}
    g = group_by_tag(slides, {"a": {"stain": "HE"}, "b": {"stain": "HE"}, "c": {}}, "stain")
    assert list(g) == ["(untagged)", "HE"] and UNTAGGED == "(untagged)"
    assert g["HE"]["slides"] == ["a", "b"] and g["HE"]["macro_iou"] == pytest.approx(0.3)
    assert g["HE"]["macro_dice"] == pytest.approx(0.3) and g["HE"]["pixel_accuracy"] == pytest.approx(0.8)
    assert g[UNTAGGED]["macro_iou"] == 0.8
    assert math.isnan(group_by_tag({"b": slides["b"]}, {}, "stain")[UNTAGGED]["macro_dice"])
