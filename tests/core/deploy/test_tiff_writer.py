"""Pyramidal class-map TIFFs (al_core.deploy.tiff_writer): a map written while its rows are still arriving,
with the lower levels encoded ahead, is the same file content as one written from the finished map."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import tifffile

from al_core.deploy.stitch import RowSignal
from al_core.deploy.tiff_writer import write_pyramid


def _class_map() -> np.ndarray:
    rng = np.random.default_rng(0)
    src = np.zeros((350, 450), np.uint8)
    src[50:200, 100:350] = 1
    src[rng.random(src.shape) < 0.01] = 2  # speckle: tiles that are not one class
    return src


def _levels(path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        return [lvl.asarray() for lvl in tif.series[0].levels]


def _nearest(src: np.ndarray, scale: float, shape: tuple[int, ...]) -> np.ndarray:
    rows = np.minimum(((np.arange(shape[0]) + 0.5) / scale).astype(int), src.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) / scale).astype(int), src.shape[1] - 1)
    return src[rows][:, cols]


@pytest.mark.parametrize("compression", ["deflate", "zstd", "lzw", "none"])
@pytest.mark.parametrize("budget", [0, 4096, 2**30])
@pytest.mark.parametrize("scale", [3.0, 4.0])  # x4 with 128 px tiles: whole-number upscales take OpenCV's path
def test_rows_arriving_give_the_same_pyramid_as_the_finished_map(tmp_path, compression, budget, scale):
    src = _class_map()
    size = (int(450 * scale), int(350 * scale) - 5)  # the last tile row clipped: the gather path
    signal = RowSignal()
    buffer = np.full_like(src, 255)  # rows not yet final hold a value no tile may show

    def predict_rows() -> None:  # the stitcher finalising rows while the writer runs
        for start in range(0, src.shape[0], 25):
            time.sleep(0.002)
            buffer[start:start + 25] = src[start:start + 25]
            signal.advance(min(start + 25, src.shape[0]))

    feeder = threading.Thread(target=predict_rows)
    feeder.start()
    levels, _ = write_pyramid(tmp_path / "live.tif", buffer, scale, size, 0.25, compression=compression,
                              tile=128, signal=signal, ahead_budget=budget)
    feeder.join()
    write_pyramid(tmp_path / "done.tif", src, scale, size, 0.25, compression=compression, tile=128)
    live, done = _levels(tmp_path / "live.tif"), _levels(tmp_path / "done.tif")
    assert levels == len(live) == len(done) >= 5
    for k, (a, b) in enumerate(zip(live, done, strict=True)):
        # every level samples the map nearest at its pixel centres, level k at scale / 2^k
        assert a.dtype == np.uint8 and np.array_equal(a, b) and np.array_equal(a, _nearest(src, scale / 2**k, a.shape))
    with tifffile.TiffFile(tmp_path / "live.tif") as tif:
        page = tif.series[0].levels[1].pages[0]
        assert page.compression == tif.pages[0].compression and page.is_tiled


def test_an_aborted_run_leaves_no_file(tmp_path):
    src = _class_map()
    signal = RowSignal()
    signal.advance(100)
    threading.Timer(0.05, signal.abort).start()
    with pytest.raises(Exception, match="inference failed"):
        write_pyramid(tmp_path / "gone.tif", src, 4.0, (1800, 1400), 0.25, tile=128, signal=signal)
    assert list(tmp_path.iterdir()) == []
