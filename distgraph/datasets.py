"""Small data sets that ship inside the package (nothing is downloaded at run time).

* :func:`load_digits`: the 1,797 8x8 hand-written digits that scikit-learn bundles (UCI ML
  "Optical Recognition of Handwritten Digits", test part), as uint8 pixel counts 0..16.
* :func:`load_text`: the seed page's text (computational graphs and backpropagation), a
  ~10 KB English character corpus.

Origins and licences: ``distgraph/data/README.md``. Both loaders read the package's own files
through :mod:`importlib.resources`, so they work from a wheel, a zip or a checkout alike, and
return fresh arrays the caller may modify.
"""

from __future__ import annotations

import io
from importlib import resources
from typing import NamedTuple

import numpy as np

from .errors import ConfigError

#: Rows of the digits set and its image side.
DIGITS_ROWS, DIGITS_SIDE = 1797, 8


class Digits(NamedTuple):
    """``images``: (1797, 8, 8) uint8 in 0..16; ``labels``: (1797,) int64 in 0..9."""

    images: np.ndarray
    labels: np.ndarray


def _read(name: str) -> bytes:
    """The bytes of ``distgraph/data/<name>``, or a ConfigError saying the install is broken."""
    try:
        return resources.files("distgraph").joinpath("data").joinpath(name).read_bytes()
    except (FileNotFoundError, NotADirectoryError) as e:
        raise ConfigError(
            f"the data file distgraph/data/{name} is missing from this installation of "
            "distgraph; reinstall the package (the wheel ships it as package data)"
        ) from e


def load_digits() -> Digits:
    """The scikit-learn digits: 1,797 8x8 images (uint8 pixel counts 0..16) and their labels.

    Scale with ``images / 16.0`` for a network; rows are in scikit-learn's order, so a split
    drawn from a seeded permutation is reproducible everywhere.
    """
    with np.load(io.BytesIO(_read("digits.npz"))) as z:
        images, labels = z["images"], z["labels"].astype(np.int64)
    if images.shape != (DIGITS_ROWS, DIGITS_SIDE, DIGITS_SIDE) or labels.shape != (DIGITS_ROWS,):
        raise ConfigError(
            f"distgraph/data/digits.npz holds images {images.shape} and labels {labels.shape}, "
            f"expected ({DIGITS_ROWS}, 8, 8) and ({DIGITS_ROWS},); reinstall distgraph"
        )
    return Digits(images, labels)


def load_text(name: str = "seed") -> str:
    """A character corpus shipped with the package; ``"seed"`` (the only one) is the seed page's
    text, UTF-8, with its line breaks."""
    if name != "seed":
        raise ConfigError(f"no text corpus {name!r} ships with distgraph; the one corpus is 'seed'")
    return _read("seed.txt").decode("utf-8")
