"""The data sets shipped inside the package: contents as documented, fresh copies, clear errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

import distgraph as dg
from distgraph import datasets

README = Path(datasets.__file__).parent / "data" / "README.md"


def test_digits_are_the_scikit_learn_set():
    images, labels = datasets.load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.int64
    assert images.max() == 16 and images.min() == 0
    # scikit-learn 1.9.1's class counts and first labels.
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert labels[:10].tolist() == list(range(10))
    digest = hashlib.sha256(images.tobytes() + labels.astype(np.uint8).tobytes()).hexdigest()
    assert digest in README.read_text()  # the README's checksum is of these bytes


def test_each_load_returns_fresh_arrays():
    first = datasets.load_digits()
    first.images[:] = 0
    assert datasets.load_digits().images.max() == 16


def test_text_is_the_seed_page():
    text = datasets.load_text()
    assert len(text) == 10157 and text.startswith("Modules\n")
    assert "Computational Graphs & Backpropagation" in text
    assert dg.datasets.load_text("seed") == text


def test_unknown_corpus_and_missing_file_are_config_errors(monkeypatch, tmp_path):
    with pytest.raises(dg.ConfigError, match=r"no text corpus 'wiki'.*'seed'"):
        datasets.load_text("wiki")
    (tmp_path / "data").mkdir()
    monkeypatch.setattr(datasets.resources, "files", lambda package: tmp_path)
    with pytest.raises(dg.ConfigError, match=r"distgraph/data/digits\.npz is missing.*reinstall"):
        datasets.load_digits()
