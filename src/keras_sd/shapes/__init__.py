"""Procedural shapes data set and its deterministic prompt-adherence checker (numpy + Pillow).

Example:
    >>> from keras_sd import shapes
    >>> images, captions = shapes.make_dataset(4, size=64, seed=0)
    >>> shapes.score(images, captions)
    1.0
"""

from keras_sd.shapes.checker import CheckResult, Reading, check, read, score
from keras_sd.shapes.dataset import (
    COLORS,
    HELD_OUT,
    SHAPES,
    Combination,
    all_combinations,
    make_dataset,
    parse_caption,
    render,
    train_combinations,
)

__all__ = [
    "COLORS",
    "HELD_OUT",
    "SHAPES",
    "CheckResult",
    "Combination",
    "Reading",
    "all_combinations",
    "check",
    "make_dataset",
    "parse_caption",
    "read",
    "render",
    "score",
    "train_combinations",
]
