"""Whole-slide images: reading slides, tissue detection, the patch grid, stain separation, raster/vector maths."""
