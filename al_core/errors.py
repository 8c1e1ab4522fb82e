"""The exceptions of slideloop: each names the file or object at fault and what is wrong with it, in domain words.

Messages never name command-line flags: the CLI adds its own hints (:data:`al_core.cli.HINTS`), the apps theirs.
"""

from __future__ import annotations

import os


class SlideloopError(Exception):
    """Base class: an error a user can act on (the CLI prints it as one line, no traceback)."""


class _AtSource(SlideloopError):
    """An error about one file or object: ``"<source>: <problem>"``."""

    def __init__(self, source: str | os.PathLike[str], problem: str) -> None:
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")

    @property
    def path(self) -> str:
        """The file (or object) at fault."""
        return self.source


class SlideError(_AtSource):
    """A slide file cannot be opened or read."""


class ScaleError(SlideError):
    """A slide's scale (µm per pixel) is unknown where it is needed, or it cannot be read at a wanted scale."""


class NoTissueError(SlideError):
    """No tissue was found on a slide (or none in the patches of its grid)."""


class UncalibratedError(ScaleError):
    """A slide without µm/px metadata is used where a physical scale is needed (a grid in µm)."""


class ProjectError(SlideloopError):
    """A project path is not a project, or an operation does not fit the project's state."""


class NoGridError(ProjectError):
    """The project has no patch grid yet (or the grid has no patches)."""


class NoModelError(ProjectError):
    """The project has no finished model version (or none with the wanted predictions)."""


class SchemaError(ProjectError):
    """The project database has a schema this version of slideloop cannot use."""


class LabelError(_AtSource):
    """A label file (GeoJSON, mask tile, label image) is malformed or does not fit the project."""


class TrainingError(SlideloopError):
    """Training cannot start or run: no labelled patches, a single class present, a bad setting."""


class CheckpointError(_AtSource):
    """A model checkpoint is missing, corrupt, or does not fit the project (class set, architecture)."""


class ModelConfigError(_AtSource, ValueError):
    """A model file or its inference config is unusable."""


class ExportError(SlideloopError):
    """Export failed or the exported model does not reproduce the torch model."""


class UnknownScaleError(ExportError):
    """A model's training scale (µm/px, or an uncalibrated downsample) is not recorded and was not given."""


class InferenceError(SlideloopError):
    """Inference over a slide failed; the message names the slide or model."""


class StainError(SlideloopError, ValueError):
    """Stain separation cannot be done on this image."""


class TileRangeError(SlideloopError, ValueError):
    """A tile index outside the pyramid (negative, beyond the slide, or above the top zoom)."""


class OutputError(_AtSource):
    """An output path cannot be used: it is a file the project manages, a read-only file or folder."""


class DiskSpaceError(_AtSource):
    """A write would need more room than the disk holding it has free (the message gives both numbers)."""


class DatabaseError(_AtSource, ProjectError):
    """The project database is damaged, foreign or unreadable (the message says how to recover)."""


class GridError(SlideloopError, ValueError):
    """A patch grid outside the limits (patch size, enlargement, patches per slide); the message gives them."""
