"""The project: its store, labels and their versions, grids and patches, model versions, jobs and runs.

The facade is :class:`al_core.project.project.Project` (also ``al_core.Project``).
"""
