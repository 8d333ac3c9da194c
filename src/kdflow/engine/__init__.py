"""The training engine: the loop, evaluation, checkpoints and resume."""
from kdflow.engine.evaluate import evaluate
from kdflow.engine.train import EpochEnd, train

__all__ = ["EpochEnd", "evaluate", "train"]
