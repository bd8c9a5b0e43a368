"""Fixtures shared by every test room."""

from pathlib import Path

import pytest

from aivailable.models import store

EMBEDDED_SOURCE = "builtin:smollm2-135m"


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    """The embedded SmolLM2 GGUF, got the way the product gets it: through the model store.

    `make` fetches it into the cache dir ($AIVAILABLE_CACHE_DIR, else ~/.cache/aivailable)
    and checks its SHA-256; on a machine where it is missing the store fetches it again.
    Never a path a person put somewhere by hand.
    """
    return store.resolve(EMBEDDED_SOURCE).path
