"""Tool calls read out of an answer as the model writes it (chat with tools in play; torch-free).

`ToolStream` takes the answer's text piece by piece and gives back what a client may have now,
as OpenAI's stream does: content, a call's start (its index, id and name, arguments ""), then
its arguments in fragments whose concatenation is the arguments' JSON text as written. The
whole answer read at once (`parse_calls` in openai_tools.py) gives the same calls, so a
streamed answer and a collected one agree.

The text it expects: for `tool_choice` auto, content and calls written as
<tool_call>{"name": ..., "arguments": {...}}</tool_call> (Hermes); for required or a named
function, one such object alone (the grammar holds the answer to it). A call's start goes out
once its name and `"arguments":` are written; a block written otherwise (keys in another
order, no arguments) goes out whole at its </tool_call> if it is a call, else as content.
Held back meanwhile: a possible start of <tool_call> and whitespace (content around calls is
trimmed, as in a collected answer).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
MAX_HEAD_CHARS = 512  # a block whose name and "arguments" have not come by then is read whole


def new_call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def whole_call(text: str) -> dict | None:
    """A block's text as one call, or None when it is none."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    return new_call(value["name"], json.dumps(value.get("arguments", {})))


@dataclass
class JsonValueEnd:
    """Finds where a JSON value ends in text given piece by piece: brackets counted outside
    strings. A scalar ends before a comma or closing bracket at depth 0."""

    depth: int = 0
    in_string: bool = False
    escaped: bool = False

    def take(self, text: str) -> tuple[int, bool]:
        """(how many characters of `text` belong to the value, whether it ended there)."""
        for i, ch in enumerate(text):
            if self.in_string:
                self.escaped, self.in_string = (False, True) if self.escaped else (ch == "\\", ch != '"')
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]" or (ch == "," and self.depth == 0):
                if self.depth == 0:
                    return i, True
                self.depth -= 1
                if self.depth == 0:
                    return i + 1, True
        return len(text), False


class ToolStream:
    def __init__(self, wrapped: bool):
        """`wrapped`: calls come in <tool_call> blocks among content (tool_choice auto); else
        the whole answer is one call's object."""
        self.wrapped = wrapped
        self.state = "content" if wrapped else "head"  # content -> head -> arguments -> tail -> content
        self.pending = ""  # text read but not given out
        self.gap = ""  # the whitespace before the current block: content again if the block is no call
        self.block = ""  # the current call's text so far (after <tool_call>)
        self.after_call = False  # content right after a call starts without its whitespace...
        self.separator = ""  # ...and with the whitespace before that call, if content came before it
        self.has_content = False
        self.calls: list[dict] = []  # every call begun, its arguments as given out so far
        self.value: JsonValueEnd | None = None

    def push(self, text: str) -> dict:
        """The delta for `text`: {"content": ...} and/or {"tool_calls": [...]}, maybe empty."""
        delta: dict = {}
        self.pending += text
        while self.pending and self._step(delta):
            pass
        return delta

    def finish(self) -> dict:
        """The delta at the answer's end: what was held back, and a block left open read whole."""
        delta: dict = {}
        if self.state == "content" and (not self.calls or self.pending.strip()):
            self._emit(delta, self.pending)
        elif self.state == "head":
            self._read_whole_block(delta, self.pending, closed=False)
        self.pending = ""
        return delta

    @property
    def cut(self) -> bool:
        """The answer ended inside a call's arguments (max_tokens)."""
        return self.state == "arguments"

    def _step(self, delta: dict) -> bool:
        """Reads what it can of `pending` in the current state; False when it must wait."""
        if self.state == "content":
            return self._content(delta)
        if self.state == "head":
            return self._head(delta)
        if self.state == "arguments":
            return self._arguments(delta)
        return self._tail()

    def _content(self, delta: dict) -> bool:
        if self.after_call:
            self.pending = self.pending.lstrip()
        start = self.pending.find(CALL_START)
        if start >= 0:
            before, self.pending = self.pending[:start], self.pending[start + len(CALL_START):]
            text = before.rstrip()
            if text:
                self._emit(delta, text)
            self.state, self.block, self.gap = "head", "", before[len(text):]
            return True
        text = self.pending[:len(self.pending) - _partial_suffix(self.pending, CALL_START)].rstrip()
        if text:  # trailing whitespace waits: it may run up to a call
            self._emit(delta, text)
            self.pending = self.pending[len(text):]
        return False

    def _called(self) -> None:
        if not self.after_call:  # the first call since content: the whitespace before it separates
            self.separator = self.gap
        self.after_call = True

    def _emit(self, delta: dict, text: str) -> None:
        if self.after_call and self.has_content:
            text = self.separator + text
        add_content(delta, text)
        self.has_content, self.after_call = True, False

    def _head(self, delta: dict) -> bool:
        match = HEAD.match(self.pending)
        if match:
            name = json.loads(f'"{match.group(1)}"')
            self.block, self.pending = self.pending[:match.end()], self.pending[match.end():]
            self.calls.append(new_call(name, ""))
            self._called()
            add_call(delta, len(self.calls) - 1, dict(self.calls[-1], function={"name": name, "arguments": ""}))
            self.state, self.value = "arguments", JsonValueEnd()
            return True
        end = self.pending.find(CALL_END) if self.wrapped else -1
        if end >= 0:
            text, self.pending = self.pending[:end], self.pending[end + len(CALL_END):]
            self._read_whole_block(delta, text, closed=True)
            return True
        if len(self.pending) > MAX_HEAD_CHARS:
            text, self.pending = self.pending, ""
            self._read_whole_block(delta, text, closed=False)
        return False

    def _arguments(self, delta: dict) -> bool:
        num_chars, ended = self.value.take(self.pending)
        fragment, self.pending = self.pending[:num_chars], self.pending[num_chars:]
        self.block += fragment
        arguments = self.calls[-1]["function"]
        fragment = fragment if arguments["arguments"] else fragment.lstrip()
        if fragment:
            arguments["arguments"] += fragment
            add_call(delta, len(self.calls) - 1, {"function": {"arguments": fragment}})
        if ended:
            self.state = "tail"
        return ended

    def _tail(self) -> bool:
        """After a call's arguments: the rest of its object and its </tool_call>, dropped."""
        end = self.pending.find(CALL_END) if self.wrapped else -1
        if end < 0:
            if not self.wrapped:
                self.pending = ""
            return False
        self.pending, self.state = self.pending[end + len(CALL_END):], "content"
        return True

    def _read_whole_block(self, delta: dict, text: str, closed: bool) -> None:
        """A block that did not open as expected: one call if its text is one, else content."""
        call = whole_call(text)
        if call is not None:
            self.calls.append(call)
            add_call(delta, len(self.calls) - 1, call)
            self._called()
        elif self.wrapped:
            self._emit(delta, self.gap + CALL_START + text + (CALL_END if closed else ""))
        else:
            self._emit(delta, text)
        self.state = "content"


def add_content(delta: dict, text: str) -> None:
    delta["content"] = delta.get("content", "") + text


def add_call(delta: dict, index: int, part: dict) -> None:
    """Adds a call's part; a fragment of the call the delta's last entry is part of joins it."""
    calls = delta.setdefault("tool_calls", [])
    if calls and calls[-1]["index"] == index and "id" not in part:
        calls[-1]["function"]["arguments"] += part["function"]["arguments"]
    else:
        calls.append({"index": index, **part, "function": dict(part["function"])})


def merged(first: dict, second: dict) -> dict:
    """Two deltas of one choice as one."""
    delta = dict(first, tool_calls=list(first.get("tool_calls", [])))
    if "content" in second:
        add_content(delta, second["content"])
    for part in second.get("tool_calls", []):
        add_call(delta, part["index"], part)
    if not delta["tool_calls"]:
        del delta["tool_calls"]
    return delta


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def tool_delta(stream: ToolStream, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
    """A streamed response's delta, and its finish reason: "tool_calls" where the answer ended
    by itself after making calls (as a collected answer's)."""
    delta = stream.push(text)
    if finish_reason is None:
        return delta, None
    delta = merged(delta, stream.finish())
    return delta, "tool_calls" if stream.calls and finish_reason == "stop" else finish_reason
