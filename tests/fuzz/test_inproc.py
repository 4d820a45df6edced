"""The in-process fuzz targets of fuzz/inproc.py at CI size, with hypothesis (the long runs use
atheris: `scripts/fuzz inproc --runs 1000000`)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz import inproc


@pytest.mark.parametrize("name", inproc.TARGETS)
def test_target(name: str) -> None:
    target = inproc.TARGETS[name]

    @settings(max_examples=2000, deadline=None)
    @given(st.binary(max_size=512))
    def run(data: bytes) -> None:
        target(data)

    run()
