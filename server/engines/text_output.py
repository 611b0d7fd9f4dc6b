"""Turn a sequence's token bytes into client text, honouring stop strings.

Token pieces are raw bytes that may split a UTF-8 character, and a stop string may span several
tokens, so text is released only once it can no longer become part of a stop string. The stop
string itself is never emitted.
"""

from __future__ import annotations

import codecs

__all__ = ["TextAssembler"]


class TextAssembler:
    """Per-sequence state: feed token bytes, get back text that is safe to send."""

    __slots__ = ("_decoder", "_held", "_hold_back", "_stops", "stopped")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = stops
        # The longest text that could still be the start of a stop string.
        self._hold_back = max((len(s) for s in stops), default=1) - 1
        self._held = ""
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that can go to the client now."""
        text = self._decoder.decode(piece)
        if not self._stops:
            return text
        self._held += text
        cut = self._earliest_stop()
        if cut is not None:
            self.stopped = True
            released, self._held = self._held[:cut], ""
            return released
        keep = self._partial_stop_length()
        released = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return released

    def flush(self) -> str:
        """At the end of generation: whatever is still held back (never a stop string)."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text

    def _earliest_stop(self) -> int | None:
        found = [i for i in (self._held.find(s) for s in self._stops) if i >= 0]
        return min(found) if found else None

    def _partial_stop_length(self) -> int:
        """Length of the longest tail of held text that is a proper prefix of a stop string."""
        held = self._held
        for n in range(min(self._hold_back, len(held)), 0, -1):
            tail = held[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0
