"""The usage trailer a host appends to a forwarded answer (peer/usage.py): found wherever the
chunks break, bounded, and never mistaken for a malformed one."""

from hypothesis import given
from hypothesis import strategies as st

from peer.usage import MAX_TRAILER, TrailerSplitter, Usage, decode_trailer, encode_trailer

BODY = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'


@given(
    usage=st.builds(Usage, st.integers(0, 10**9), st.integers(0, 10**9)),
    cuts=st.lists(st.integers(0, len(BODY) + 60), max_size=6),
)
def test_the_client_gets_the_body_and_the_entry_peer_the_usage_wherever_chunks_break(usage, cuts):
    stream = BODY + encode_trailer(usage)
    edges = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    splitter = TrailerSplitter()
    passed = b"".join(splitter.feed(stream[a:b]) for a, b in zip(edges, edges[1:], strict=False))
    assert passed == BODY
    assert splitter.usage() == usage


def test_no_trailer_or_a_broken_one_is_no_usage():
    splitter = TrailerSplitter()
    assert splitter.feed(BODY) == BODY and splitter.usage() is None  # the host died first
    for bad in (
        b"[1, 2]",
        b'{"prompt_tokens": -1, "completion_tokens": 2}',
        b"{",
        b'{"prompt_tokens": true, "completion_tokens": 1}',
    ):
        assert decode_trailer(bad) is None


def test_a_host_cannot_make_the_entry_peer_buffer_its_stream():
    splitter = TrailerSplitter()
    splitter.feed(b"\x00" + b"x" * 100)
    for _ in range(1000):
        assert splitter.feed(b"y" * MAX_TRAILER) == b""
    assert splitter.overflow and splitter.usage() is None
