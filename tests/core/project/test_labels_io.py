"""Label files into and out of a project (al_core.project.labels_io, label_import): QuPath GeoJSON, mask-tile
folders, label images; errors name the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from shapely.geometry import MultiPolygon, box, shape

from al_core import GridSpec, LabelError
from al_core.project.labels_io import geojson_bytes, read_geojson


@pytest.fixture()
def project(three_class_project):
    return three_class_project


def _fc(*features):
    return {"type": "FeatureCollection", "features": list(features)}


def _feat(coords, name="Epithelium", color=(200, 0, 0)):
    return {"type": "Feature", "id": "x", "geometry": {"type": "Polygon", "coordinates": [coords]},
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": list(color)}}}


def test_import_sample_preannotation(project, sample_geojson):
    res = project.import_labels(sample_geojson)
    assert res.slide == "CMU-1-Small-Region" and res.version == 1 and res.shapes > 0
    area = sum(g.area for _, _, g in project.annotations(res.slide))
    assert 0.05 < area / (2220 * 2967) < 0.4


def test_geojson_errors_name_the_file(tmp_path, project):
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(LabelError, match="bad.geojson: not valid JSON"):
        project.import_labels(bad)
    nogeom = tmp_path / "nogeom.geojson"
    nogeom.write_text(json.dumps(_fc({"type": "Feature", "geometry": None, "properties": {}})))
    with pytest.raises(LabelError, match="nogeom.geojson: contains no polygon geometry"):
        project.import_labels(nogeom)
    unknown = tmp_path / "unknown.geojson"
    unknown.write_text(json.dumps(_fc(_feat([[0, 0], [10, 0], [10, 10], [0, 0]], name="Tumour"))))
    with pytest.raises(LabelError, match="unknown class 'Tumour'.*Epithelium"):
        project.import_labels(unknown)
    outside = tmp_path / "outside.geojson"
    outside.write_text(json.dumps(_fc(_feat([[5000, 5000], [5100, 5000], [5100, 5100], [5000, 5000]]))))
    with pytest.raises(LabelError, match="outside the slide"):
        project.import_labels(outside)
    # nothing was stored by the failed imports
    assert project.label_version("CMU-1-Small-Region") == 0


def test_self_intersecting_polygon_is_repaired_and_reported(tmp_path, project):
    bowtie = [[100, 100], [300, 300], [300, 100], [100, 300], [100, 100]]
    p = tmp_path / "CMU-1-Small-Region.geojson"
    p.write_text(json.dumps(_fc(_feat(bowtie), _feat([[2100, 10], [2400, 10], [2400, 50], [2100, 50], [2100, 10]]))))
    res = project.import_labels(p)
    assert any("repaired 1" in n for n in res.notes)
    assert any("clipped 1" in n for n in res.notes)
    geoms = [g for _, _, g in project.annotations("CMU-1-Small-Region")]
    assert all(g.is_valid for g in geoms)
    assert geoms[0].area == pytest.approx(20000, rel=0.01)  # two triangles of the bow-tie
    assert geoms[1].bounds[2] == 2220  # clipped at the slide edge


def test_export_import_round_trip(tmp_path, project, sample_geojson):
    project.import_labels(sample_geojson)
    out = tmp_path / "out.geojson"
    n = project.export_labels(out)
    data = json.loads(out.read_text())
    assert len(data["features"]) == n
    f = data["features"][0]
    assert f["properties"]["classification"] == {"name": "Epithelium", "color": [200, 0, 0]}
    assert f["properties"]["objectType"] == "annotation"
    before = [g for _, _, g in project.annotations("CMU-1-Small-Region")]
    again = read_geojson(out)
    assert [s.class_name for s in again.shapes] == ["Epithelium"] * n
    for a, b in zip(before, again.shapes, strict=True):
        assert a.symmetric_difference(b.geometry).area < 1e-6 * a.area


def test_label_image_import(tmp_path, project):
    label = np.zeros((2967, 2220), np.uint8)
    label[1000:1500, 800:1200] = 1
    label[1600:1700, 900:1000] = 2
    p = tmp_path / "CMU-1-Small-Region.labels.tif"
    tifffile.imwrite(p, label, compression="zlib")
    res = project.import_labels(p)
    assert res.shapes == 2
    project.build_grid(GridSpec(patch=256, overlap=0, min_tissue=0.0, downsample=1.0))
    patch = next(q for q in project.patches() if q.x <= 1000 < q.x + 256 and q.y <= 1500 < q.y + 256)
    got = project.label_mask(patch)
    want = label[patch.y : patch.y + 256, patch.x : patch.x + 256]
    assert np.array_equal(got, want)
    wrong = tmp_path / "wrong.png"
    Image.fromarray(label[:100, :100]).save(wrong)
    with pytest.raises(LabelError, match="wrong.png: label image is 100x100 px, the slide is 2220x2967"):
        project.import_labels(wrong, slide="CMU-1-Small-Region")


def test_mask_tile_folder(tmp_path, project):
    # a QuPath/NoCodeSeg tile export: Images/ + Labels/, region in the name, 2x down
    labels = tmp_path / "export" / "Labels"
    labels.mkdir(parents=True)
    (tmp_path / "export" / "Images").mkdir()
    tile = np.zeros((256, 256), np.uint8)
    tile[64:192, 64:192] = 1
    Image.fromarray(tile).save(labels / "CMU-1-Small-Region [d=2,x=512,y=1024,w=512,h=512]-labelled.png")
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(labels / "CMU-1-Small-Region [d=2,x=0,y=0,w=512,h=512].png")
    res = project.import_labels(tmp_path / "export")
    assert res.slide == "CMU-1-Small-Region"
    [(_, cls, geom)] = project.annotations("CMU-1-Small-Region")
    assert cls == 1
    assert geom.equals(box(512 + 128, 1024 + 128, 512 + 384, 1024 + 384))
    Image.fromarray(np.zeros((100, 256), np.uint8)).save(labels / "CMU-1-Small-Region [d=2,x=0,y=512,w=512,h=512].png")
    with pytest.raises(LabelError, match=r"mask is 256x100 px but its name says 512x512 at d=2"):
        project.import_labels(tmp_path / "export")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1e5), st.floats(0, 1e5), st.floats(0.001, 5e3), st.booleans()),
                min_size=1, max_size=4), st.text(min_size=1, max_size=12))
def test_geojson_bytes_writes_every_vertex_exactly(boxes, name):
    """The GEOS writer must not round coordinates (QuPath re-imports what we export) and the feature wrapper
    must stay valid JSON whatever the class name holds."""
    shapes = []
    for x, y, size, holed in boxes:
        outer = box(x, y, x + size, y + size * 0.7)
        geom = outer.difference(box(x + size / 4, y + size / 8, x + size / 2, y + size / 4)) if holed else outer
        shapes.append((geom, name, "#12ab9f"))
    shapes.append((MultiPolygon([box(0.1, 0.2, 1.3, 1.4), box(3.5, 3.25, 4.125, 4.0625)]), name, "#000000"))
    data = json.loads(geojson_bytes(shapes))
    assert data["type"] == "FeatureCollection" and len(data["features"]) == len(shapes)
    for f, (geom, n, color) in zip(data["features"], shapes, strict=True):
        assert shape(f["geometry"]).equals_exact(geom, 0)
        assert f["properties"]["classification"] == {"name": n, "color": [int(color[i:i + 2], 16) for i in (1, 3, 5)]}
    assert json.loads(geojson_bytes([])) == {"type": "FeatureCollection", "features": []}
