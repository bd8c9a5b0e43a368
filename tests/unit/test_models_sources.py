"""Model source strings and quant picking: pure functions, no network."""

import pytest

from aivailable.models import store
from aivailable.models.sources import (
    HfFile,
    HfQuant,
    ModelSourceError,
    UrlFile,
    parse_remote,
    pick_gguf,
    remote_model_name,
)

SHA = "ab" * 32


@pytest.mark.parametrize(
    ("source", "parsed", "name"),
    [
        ("hf://org/Repo-GGUF/m-Q4_K_M.gguf", HfFile("org/Repo-GGUF", "m-Q4_K_M.gguf"), "m-Q4_K_M"),
        ("hf://org/r/sub/dir/m.GGUF", HfFile("org/r", "sub/dir/m.GGUF"), "m"),
        ("hf://org/r@v1.0/m.gguf", HfFile("org/r", "m.gguf", "v1.0"), "m"),
        ("hf://org/Repo-GGUF:Q8_0", HfQuant("org/Repo-GGUF", "Q8_0"), "Repo-GGUF:Q8_0"),
        ("hf://org/r@abc123:IQ2_XS", HfQuant("org/r", "IQ2_XS", "abc123"), "r:IQ2_XS"),
        ("hf://org/Repo-GGUF", HfQuant("org/Repo-GGUF", None), "Repo-GGUF"),
        (
            "https://h.example/a/b/m.gguf",
            UrlFile("https://h.example/a/b/m.gguf", "m.gguf", None),
            "m",
        ),
        (
            f"http://127.0.0.1:8/m.gguf#sha256={SHA.upper()}",
            UrlFile("http://127.0.0.1:8/m.gguf", "m.gguf", SHA),
            "m",
        ),
    ],
)
def test_sources_parse_and_name(source, parsed, name):
    assert parse_remote(source) == parsed
    assert remote_model_name(parsed) == name == store.model_name(source)


@pytest.mark.parametrize(
    "source",
    [
        "hf://org",
        "hf://org/repo/../../etc/passwd.gguf",
        "hf://org/repo/./m.gguf",
        "hf://org/repo//m.gguf",
        "hf://org/repo/m.bin",
        "hf://org/../x:Q4_0",
        "hf://org/repo:Q4 K",
        "hf://-org/repo:Q4_0",
        "https://h.example/",
        "https://h.example/m.bin",
        "https://h.example/m.gguf#md5=00",
        "https://h.example:99999/m.gguf",
        "ftp://h.example/m.gguf",
    ],
)
def test_malformed_or_escaping_sources_are_refused(source):
    with pytest.raises(ModelSourceError):
        parse_remote(source)


FILES = [
    "README.md",
    "m-Q4_K.gguf",
    "m-Q4_K_M.gguf",
    "m-IQ4_XS.gguf",
    "m-F16.gguf",
    "m-BF16.gguf",
    "m-Q4_0.gguf",
    "m-Q4_0_4_4.gguf",
    "mmproj-m-F16.gguf",
    "big/m-Q8_0-00001-of-00002.gguf",
    "big/m-Q8_0-00002-of-00002.gguf",
]


@pytest.mark.parametrize(
    ("quant", "picked"),
    [
        ("Q4_K", "m-Q4_K.gguf"),
        ("Q4_K_M", "m-Q4_K_M.gguf"),
        ("q4_k_m", "m-Q4_K_M.gguf"),
        (None, "m-Q4_K_M.gguf"),
        ("F16", "m-F16.gguf"),  # not BF16, not the mmproj
        ("BF16", "m-BF16.gguf"),
        ("Q4_0", "m-Q4_0.gguf"),  # not Q4_0_4_4
        ("XS", None),  # no whole tag: IQ4_XS does not count
    ],
)
def test_a_quant_picks_the_file_with_that_whole_tag(quant, picked):
    if picked is None:
        with pytest.raises(ModelSourceError, match="has no XS GGUF"):
            pick_gguf(FILES, quant, "org/r")
    else:
        assert pick_gguf(FILES, quant, "org/r") == picked


def test_picking_refuses_splits_ambiguity_and_empty_repos():
    with pytest.raises(ModelSourceError, match="split into several files"):
        pick_gguf(FILES, "Q8_0", "org/r")
    with pytest.raises(ModelSourceError, match="matches several files"):
        pick_gguf(["a/m-Q8_0.gguf", "b/m-Q8_0.gguf"], "Q8_0", "org/r")
    assert pick_gguf(["m-Q8_0.gguf", "b/m-Q8_0.gguf"], "Q8_0", "org/r") == "m-Q8_0.gguf"
    with pytest.raises(ModelSourceError, match="has no GGUF"):
        pick_gguf(["README.md", "mmproj-x.gguf"], None, "org/r")
    # Without a quant, a repo's only GGUF is it, whatever its name.
    assert pick_gguf(["README.md", "weights.gguf"], None, "org/r") == "weights.gguf"
    with pytest.raises(ModelSourceError, match=r"hf://org/r:QUANT"):
        pick_gguf(["m-Q8_0.gguf", "m-F16.gguf"], None, "org/r")
