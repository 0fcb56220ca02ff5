"""Stop strings on streamed text (torch-free).

Text arrives in pieces, and a stop string may straddle two of them. The matcher releases text
as soon as it cannot be the start of a stop string, holds back the shortest tail that still
could be, and on a match cuts the text just before it (as OpenAI's API does).
"""

from __future__ import annotations

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


def validate_stop(stop: list[str]) -> None:
    """Raises ValueError naming the problem."""
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
    for i, s in enumerate(stop):
        if not s or len(s) > MAX_STOP_CHARS:
            raise ValueError(f"stop[{i}]: must be 1 to {MAX_STOP_CHARS} characters, got {len(s)}")


class StopStringMatcher:
    def __init__(self, stop: list[str]):
        self.stop = list(stop)
        self.held = ""  # released later, or dropped on a match

    def push(self, text: str, final: bool = False) -> tuple[str, bool]:
        """(the text that may go out now, whether a stop string matched). After a match,
        nothing more should be pushed. `final`: the stream ends, release what is held."""
        text = self.held + text
        match = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if match >= 0:
            self.held = ""
            return text[:match], True
        keep = 0 if final else self._partial_tail(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def _partial_tail(self, text: str) -> int:
        """The length of the longest tail of `text` that some stop string starts with."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
