"""The exceptions of slideloop: each names the file or object at fault and what is wrong with it."""

from __future__ import annotations

from pathlib import Path


class SlideloopError(Exception):
    """Base class: an error a user can act on (the CLI prints it as one line, no traceback)."""


class SlideError(SlideloopError):
    """A slide file cannot be opened or read."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ProjectError(SlideloopError):
    """A project path is not a project, or an operation does not fit the project's state."""


class SchemaError(ProjectError):
    """The project database has a schema this version of slideloop cannot use."""


class LabelError(SlideloopError):
    """A label file (GeoJSON, mask tile, label image) is malformed or does not fit the project."""

    def __init__(self, source: str | Path, problem: str) -> None:
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class TrainingError(SlideloopError):
    """Training cannot start or run: no labelled patches, a single class present, a bad setting."""


class CheckpointError(SlideloopError):
    """A model checkpoint is missing, corrupt, or does not fit the project (class set, architecture)."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
