"""Studies: a grid of runs (datasets × teacher–student pairs × methods × conditions × seeds), a teacher
cache, a pool of workers or a Slurm array, an SQLite results store, and the report's tables and plots."""

from kdflow.study.grid import Grid, Run, expand, shard
from kdflow.study.spec import StudySpec, load_study, parse_study

__all__ = ["Grid", "Run", "StudySpec", "expand", "load_study", "parse_study", "shard"]
