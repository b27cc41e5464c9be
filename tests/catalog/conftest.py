import shutil

import pytest


@pytest.fixture
def root(trained_store, tmp_path) -> str:
    """A private copy of the trained store: catalog writes must not reach the session's store."""
    dst = tmp_path / "store"
    shutil.copytree(trained_store[1], dst)
    return str(dst)
