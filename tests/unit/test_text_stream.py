"""Token bytes to text: stop strings and UTF-8 characters split across tokens."""

from hypothesis import given
from hypothesis import strategies as st

from aivailable.api.structured import tool_calls_in
from aivailable.backends.text_stream import TextStream


def feed_all(stream: TextStream, pieces: list[bytes]) -> str:
    out = "".join(stream.feed(p) for p in pieces)
    return out + stream.finish()


def test_a_stop_string_split_across_tokens_ends_the_text_before_it():
    s = TextStream(("END",))
    assert s.feed(b"Hello E") == "Hello "  # "E" might begin the stop string: held
    assert s.feed(b"N") == ""
    assert s.feed(b"D and more") == "" and s.stopped
    assert s.finish() == "" and s.text == "Hello "


def test_held_text_is_released_when_it_turns_out_not_to_stop():
    s = TextStream(("END",))
    assert s.feed(b"E") == ""
    assert s.feed(b"X") == "EX"
    assert s.feed(b"EN") == ""
    assert s.finish() == "EN"


def test_a_character_split_across_tokens_is_sent_whole():
    data = "é€".encode()
    s = TextStream()
    assert s.feed(data[:1]) == ""
    assert s.feed(data[1:3]) == "é"
    assert s.feed(data[3:]) == "€"


@given(
    st.text(max_size=40), st.lists(st.integers(1, 5), max_size=20), st.text(min_size=1, max_size=4)
)
def test_any_split_gives_the_text_up_to_the_first_stop(text, cuts, stop):
    data = text.encode()
    pieces, at = [], 0
    for cut in cuts:
        pieces.append(data[at : at + cut])
        at += cut
    pieces.append(data[at:])
    expected = text.split(stop)[0]
    assert feed_all(TextStream((stop,)), pieces) == expected


def test_tool_calls_are_recognised_only_for_known_functions():
    functions = [{"name": "weather", "parameters": {}}]
    (call,) = tool_calls_in('{"name": "weather", "arguments": {"city": "Oslo"}}', functions)
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "weather", "arguments": '{"city": "Oslo"}'}
    assert tool_calls_in('{"name": "other", "arguments": {}}', functions) is None
    assert tool_calls_in("It is sunny.", functions) is None


def test_a_continued_prompt_ends_where_the_final_message_ends():
    from aivailable.backends.llama_runtime import continued

    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello th<|im_end|>\n<|im_start|>assistant\n"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello th"}]
    assert (
        continued(prompt, messages)
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello th"
    )
    import pytest

    with pytest.raises(ValueError):
        continued("nothing of it", messages)
