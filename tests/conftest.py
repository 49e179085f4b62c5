"""Session-wide settings of the test run."""

from __future__ import annotations

import pytest

from qwenlm.generation import program_store

USERS_FOLDER = program_store.folder  # where programs go outside the tests (``<cache_dir>/aoti``)


@pytest.fixture(autouse=True, scope="session")
def _programs_in_a_folder_of_the_session(tmp_path_factory):
    """The tests' compiled decoding programs go to a folder of the session: in the user's store the tiny test
    models' programs would push out the real ones (only the ``KEEP`` most recent are kept)."""
    patch = pytest.MonkeyPatch()
    session = tmp_path_factory.mktemp("aoti")
    patch.setattr(program_store, "folder", lambda: session)
    yield
    patch.undo()
