"""Shared fixtures: paths to the real photos kept in tests/photos."""

from __future__ import annotations

from pathlib import Path

import pytest

PHOTOS = Path(__file__).parent / "photos"


@pytest.fixture
def photos_dir() -> Path:
    """Folder of real photographs (copied from scikit-image's data, licences in its README)."""
    return PHOTOS
