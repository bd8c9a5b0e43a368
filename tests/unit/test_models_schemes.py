"""One list of source kinds (aivailable.models.sources.SCHEMES): every check that asks what
kind a source is reads it, so they cannot disagree again (before this, the deploy check
refused http:// sources that the store fetched)."""

import pytest

from aivailable.models import sources, store
from aivailable.models.check import refuse_reason
from aivailable.models.sources import SCHEMES, ModelSourceError


def test_the_schemes_are_distinct_and_their_examples_their_own():
    prefixes = [s.prefix for s in SCHEMES]
    assert len(set(prefixes)) == len(prefixes)
    for scheme in SCHEMES:
        assert sources.scheme_of(scheme.example) == scheme
        assert scheme.shape.split(" ")[0].startswith(scheme.prefix.rstrip("/"))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.prefix)
def test_every_check_agrees_on_every_scheme(scheme):
    source = scheme.example
    assert sources.is_remote(source) is scheme.remote
    assert not sources.has_unknown_scheme(source)
    assert refuse_reason(source) is None  # left to the store, which knows the kind
    assert scheme.shape in sources.shapes()
    if scheme.remote:
        parsed = sources.parse_remote(source)  # a parser for every remote kind
        assert sources.model_name(source) == sources.remote_model_name(parsed)
    else:
        with pytest.raises(ModelSourceError, match="not a remote model source"):
            sources.parse_remote(source)
    assert store.model_name(source) == sources.model_name(source)


@pytest.mark.parametrize("source", ["ftp://h/m.gguf", "s3://b/m.gguf", "//h/m.gguf", "file://m"])
def test_a_source_no_scheme_claims_is_refused_and_not_remote(source):
    assert sources.scheme_of(source) is None and not sources.is_remote(source)
    assert sources.has_unknown_scheme(source)
    why = refuse_reason(source)
    assert why is not None and "unknown model source" in why
    for scheme in SCHEMES:  # the message offers every kind there is
        assert scheme.shape in why
    with pytest.raises(ModelSourceError):
        sources.parse_remote(source)


def test_a_local_path_is_no_scheme(tmp_path):
    path = str(tmp_path / "m.gguf")
    assert sources.scheme_of(path) is None and not sources.has_unknown_scheme(path)
    assert "not a regular file" in refuse_reason(path)
    assert sources.model_name(path) == "m"
