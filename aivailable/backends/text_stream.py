"""Token bytes to client text: UTF-8 split across tokens, and stop strings across tokens.

A token may end inside a multi-byte character, and a stop string may begin in one token
and end in the next. `TextStream` holds back exactly what could still turn out to be a
stop string or half a character, and releases the rest at once. Pure.
"""

from __future__ import annotations

import codecs


class TextStream:
    def __init__(self, stop: tuple[str, ...] = ()):
        self.stop = tuple(s for s in stop if s)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded text not yet released
        self.text = ""  # everything released so far
        self.stopped = False

    def feed(self, data: bytes) -> str:
        """Add a token's bytes; returns the text safe to send now. After a stop string
        is seen, `stopped` is True and nothing more is released."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(data)
        cut = min((i for s in self.stop if (i := self._held.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._release(cut)
        keep = max((_partial_suffix(self._held, s) for s in self.stop), default=0)
        return self._release(len(self._held) - keep)

    def finish(self) -> str:
        """The generation ended: release what was held (a stop string never completed)."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(b"", final=True)
        return self._release(len(self._held))

    def _release(self, upto: int) -> str:
        out, self._held = self._held[:upto], ("" if self.stopped else self._held[upto:])
        self.text += out
        return out


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
