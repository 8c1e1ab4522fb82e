"""Open whole-slide images (SVS, NDPI, pyramidal/OME TIFF via tiffslide; PNG/JPEG as one level) and read them.

The one place that talks to tiffslide. Coordinates are level-0 pixels unless a name says otherwise.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from al_core.errors import ScaleError, SlideError

RGBArray = npt.NDArray[np.uint8]

#: file suffixes read through tiffslide (TIFF containers)
TIFF_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".qptiff", ".btf")
#: file suffixes read whole into memory as a single-level slide
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# a level whose downsample is within 1 % above the wanted one is still "that" level: pyramids built by
# halving odd sizes have downsamples like 2.0003, and refusing them would read 4x the pixels from level 0
_LEVEL_TOLERANCE = 1.01


class Slide:
    """A read-only whole-slide image.

    Use :func:`open_slide`; the object is not thread-safe (open one per thread for concurrent reads).
    """

    def __init__(self, path: Path, backend: _Backend, mpp: float | None) -> None:
        self.path = path
        self._backend = backend
        self.mpp = mpp

    # --- metadata -------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self._backend.level_dimensions[0]

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of every pyramid level, level 0 first."""
        return self._backend.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Each level's downsample from level 0."""
        return self._backend.level_downsamples

    @property
    def level_count(self) -> int:
        """The number of pyramid levels."""
        return len(self._backend.level_dimensions)

    @property
    def objective_power(self) -> float | None:
        """The scan's objective magnification (e.g. 40), where the file records it."""
        return self._backend.objective_power

    @property
    def vendor(self) -> str:
        """The scanner vendor tiffslide recognised (``aperio``, ``generic``...)."""
        return self._backend.vendor

    @property
    def description(self) -> str:
        """The file's ImageDescription text (empty where it has none)."""
        return self._backend.description

    def require_mpp(self) -> float:
        """The slide's µm per pixel, or a clear error when neither the file nor the user gave one."""
        if self.mpp is None:
            raise ScaleError(self.path, "has no microns-per-pixel metadata; give its scale (e.g. 0.25 µm/px for 40x)")
        return self.mpp

    def downsample_for_mpp(self, target_mpp: float) -> float:
        """Level-0 downsample that gives ``target_mpp`` µm per output pixel."""
        return target_mpp / self.require_mpp()

    # --- reading --------------------------------------------------------------------------------
    def best_level(self, downsample: float) -> int:
        """The coarsest level that is still at least as fine as ``downsample``."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * _LEVEL_TOLERANCE:
                best = level
        return best

    def read_level(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> RGBArray:
        """Read ``size`` (w, h) pixels of ``level`` whose top-left is ``location`` in level-0 pixels.

        Areas outside the slide are white.
        """
        try:
            return self._backend.read(location, level, size)
        except SlideError:
            raise
        except Exception as err:  # codec and I/O errors from tifffile/imagecodecs
            raise SlideError(self.path, f"cannot read level {level} at {location}: {err}") from err

    def read(
        self,
        location: tuple[int, int],
        size: tuple[int, int],
        *,
        downsample: float | None = None,
        target_mpp: float | None = None,
    ) -> RGBArray:
        """Read an output image of ``size`` (w, h) whose top-left is ``location`` (level 0).

        The region covers ``size * downsample`` level-0 pixels; it is read from the best pyramid level and
        resized once (area interpolation). Give ``downsample`` or ``target_mpp`` (µm per output pixel).
        """
        ds = self._resolve_downsample(downsample, target_mpp)
        level = self.best_level(ds)
        level_ds = self.level_downsamples[level]
        w, h = size
        region = (max(1, round(w * ds / level_ds)), max(1, round(h * ds / level_ds)))
        image = self.read_level(location, level, region)
        if region != (w, h):
            image = np.asarray(cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if region[0] > w
                                          else cv2.INTER_LINEAR), dtype=np.uint8)
        return image

    def read_raw(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> npt.NDArray[Any]:
        """The stored samples of ``size`` (w, h) pixels of ``level`` at level-0 ``location``, not converted to
        RGB (a class map stays one channel of class indices); zero outside the image."""
        try:
            return self._backend.read_raw(location, level, size)
        except Exception as err:  # codec and I/O errors from tifffile/imagecodecs
            raise SlideError(self.path, f"cannot read level {level} at {location}: {err}") from err

    def thumbnail(self, max_size: int = 1024) -> tuple[RGBArray, float]:
        """The whole slide at most ``max_size`` px on its long side, and its downsample from level 0."""
        w, h = self.dimensions
        ds = max(1.0, max(w, h) / max_size)
        out = (max(1, math.floor(w / ds)), max(1, math.floor(h / ds)))
        return self.read((0, 0), out, downsample=ds), ds

    def _resolve_downsample(self, downsample: float | None, target_mpp: float | None) -> float:
        if (downsample is None) == (target_mpp is None):
            raise ValueError("give exactly one of downsample or target_mpp")
        ds = downsample if downsample is not None else self.downsample_for_mpp(float(target_mpp))  # type: ignore[arg-type]
        if not ds > 0:
            raise ValueError(f"downsample must be positive, got {ds}")
        return ds

    def close(self) -> None:
        """Close the slide file."""
        self._backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, dimensions={self.dimensions}, levels={self.level_count}, mpp={self.mpp})"


def open_slide(path: str | os.PathLike[str], mpp: float | None = None) -> Slide:
    """Open a slide file; ``mpp`` (µm per pixel) overrides or supplies the file's own.

    Raises :class:`SlideError` naming the file for a missing, unsupported, corrupt or truncated file.
    """
    p = Path(path)
    if not p.exists():
        raise SlideError(p, "file not found")
    if p.is_dir():
        raise SlideError(p, "is a directory, not a slide file")
    if mpp is not None and not (mpp > 0 and math.isfinite(mpp)):
        raise SlideError(p, f"mpp must be a positive number, got {mpp}")
    suffix = p.suffix.lower()
    backend: _Backend
    if suffix in TIFF_SUFFIXES:
        backend = _TiffBackend(p)
    elif suffix in IMAGE_SUFFIXES:
        backend = _ImageBackend(p)
    else:
        raise SlideError(
            p, f"unsupported file type {suffix or '(none)'}; expected one of {', '.join(TIFF_SUFFIXES + IMAGE_SUFFIXES)}"
        )
    return Slide(p, backend, mpp if mpp is not None else backend.mpp)


# --- backends -----------------------------------------------------------------------------------


class _Backend:
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None = None
    objective_power: float | None = None
    vendor: str = "generic"
    description: str = ""

    def read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> RGBArray:
        raise NotImplementedError

    def read_raw(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> npt.NDArray[Any]:
        return self.read(location, level, size)

    def close(self) -> None:
        pass


class _TiffBackend(_Backend):
    def __init__(self, path: Path) -> None:
        import tifffile
        import tiffslide

        self.path = path
        try:
            self._slide = tiffslide.TiffSlide(path)
            dims = self._slide.level_dimensions
            if not dims:
                raise SlideError(path, "contains no image levels")
        except SlideError:
            raise
        except (tifffile.TiffFileError, ValueError, KeyError, IndexError, OSError, TypeError) as err:
            raise SlideError(path, f"not a readable TIFF slide ({type(err).__name__}: {err})") from err
        self.level_dimensions = tuple((int(w), int(h)) for w, h in dims)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        props = self._slide.properties
        self.mpp = _positive(props.get("tiffslide.mpp-x"))
        self.objective_power = _positive(props.get("tiffslide.objective-power"))
        self.vendor = str(props.get("tiffslide.vendor") or "generic")
        self.description = str(props.get("tiff.ImageDescription") or "")
        self._check_complete()

    def _check_complete(self) -> None:
        # A truncated file opens fine (the header is at the start) and fails on the first missing tile,
        # possibly much later inside training; compare every tile's extent with the file size instead.
        size = self.path.stat().st_size
        tiff = self._slide.ts_tifffile
        series = tiff.series[int(self._slide.properties.get("tiffslide.series-index") or 0)]
        for level in series.levels:
            for page in level.pages:
                if page is None:
                    continue
                offsets = getattr(page, "dataoffsets", ())
                counts = getattr(page, "databytecounts", ())
                if offsets and counts and max(o + c for o, c in zip(offsets, counts, strict=False)) > size:
                    raise SlideError(self.path, "is truncated: image data extends past the end of the file")
                if counts and any(c == 0 for c in counts) and len(counts) > 1:
                    raise SlideError(self.path, "is incomplete: some image tiles have no data")

    def read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> RGBArray:
        # tiffslide pads outside the image with black; glass is white, so read the inside part and paste it
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        x, y = location
        lx, ly = math.floor(x / ds), math.floor(y / ds)
        w, h = size
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, lw), min(ly + h, lh)
        if (x0, y0, x1, y1) == (lx, ly, lx + w, ly + h):
            return _to_rgb(np.asarray(self._slide.read_region(location, level, size, as_array=True)))
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            loc0 = (round(x0 * ds) if x0 != lx else x, round(y0 * ds) if y0 != ly else y)
            part = self._slide.read_region(loc0, level, (x1 - x0, y1 - y0), as_array=True)
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = _to_rgb(np.asarray(part))
        return out

    def read_raw(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> npt.NDArray[Any]:
        arr = np.asarray(self._slide.read_region(location, level, size, as_array=True))
        return arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr

    def close(self) -> None:
        self._slide.close()


class _ImageBackend(_Backend):
    def __init__(self, path: Path) -> None:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.load()
                self._image = np.asarray(im.convert("RGB"))
                dpi = im.info.get("dpi")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise SlideError(path, f"not a readable image ({err})") from err
        h, w = self._image.shape[:2]
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)
        # PNG/JPEG carry no microscope metadata; a DPI of 72/96 is a screen default, not a scan resolution
        self.mpp = None
        del dpi

    def read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> RGBArray:
        if level != 0:
            raise IndexError(f"level {level} does not exist (one-level image)")
        x, y = location
        w, h = size
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        H, W = self._image.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._image[y0:y1, x0:x1]
        return out


def _to_rgb(arr: npt.NDArray[Any]) -> RGBArray:
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] == 4:
        # tiffslide pads outside the image with transparent pixels: show them white, like glass
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        arr = (arr[..., :3] * alpha + 255.0 * (1.0 - alpha)).round()
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255)
    return np.ascontiguousarray(arr[..., :3], dtype=np.uint8)


def _positive(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if v > 0 and math.isfinite(v) else None


def level_table(slide: Slide) -> Sequence[dict[str, Any]]:
    """One row per level: dimensions, downsample and mpp, for status output."""
    return [
        {
            "level": i,
            "width": w,
            "height": h,
            "downsample": round(ds, 4),
            "mpp": None if slide.mpp is None else round(slide.mpp * ds, 4),
        }
        for i, ((w, h), ds) in enumerate(zip(slide.level_dimensions, slide.level_downsamples, strict=True))
    ]
