"""Tool calling for chat completions: tools written into the conversation, `tool_choice` as
structured output, and the calls parsed out of the answer (torch-free).

A model's chat template may not know tools (SmolLM2's does not), so the gateway writes them
into the system message in the Hermes format many open models are trained on, and writes a
conversation's earlier calls back as text (an assistant's calls as <tool_call>{...}</tool_call>;
a tool's result as a "tool" message). `tool_choice`:
- "none": the tools are not shown; the answer is text;
- "auto" (the default with tools): the calls the model writes as <tool_call>{"name": ...,
  "arguments": {...}}</tool_call> are parsed out of its answer; the rest is its content;
- "required", or {"type": "function", "function": {"name": ...}}: the answer is held (a JSON
  schema) to one call of any of the tools, or of the named one, with arguments that match its
  parameters.
Streamed, the content and each call's name and arguments go out as they are written
(tool_stream.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from pdserve.protos import pdserve_pb2 as pb

from .api_errors import bad
from .tool_stream import CALL_START, ToolStream, merged

MAX_TOOLS = 128
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
SYSTEM = ("You are a function calling AI model. You are provided with function signatures within <tools></tools> "
          "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions "
          "about what values to plug into functions.\n<tools>\n{tools}\n</tools>\nFor each function call return a "
          "json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
          '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


@dataclass
class ToolPlan:
    """How a chat request uses its tools: `mode` auto, required or named (`name`)."""

    mode: str
    tools: list[dict]
    name: str | None = None

    def schema(self) -> dict | None:
        """The JSON schema the answer is held to (required and named), else None."""
        if self.mode == "auto":
            return None
        calls = [_call_schema(t) for t in self.tools if self.mode == "required" or t["name"] == self.name]
        return calls[0] if len(calls) == 1 else {"anyOf": calls}


def tool_plan(body: dict) -> ToolPlan | None:
    """The request's tools and tool_choice, checked; None when no tool is in play."""
    tools = [_tool(t, i) for i, t in enumerate(body.get("tools") or [])]
    if len(tools) > MAX_TOOLS:
        raise bad("tools", f"at most {MAX_TOOLS} tools")
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return None
    if not tools:
        raise bad("tool_choice", "needs tools")
    if choice in ("auto", "required"):
        return ToolPlan(choice, tools)
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(name, str):
        raise bad("tool_choice", 'expected "none", "auto", "required" or {"type": "function", "function": {"name": ...}}')
    if name not in {t["name"] for t in tools}:
        raise bad("tool_choice", f"names {name!r}, which is not among the tools")
    return ToolPlan("named", tools, name)


def _tool(tool, i: int) -> dict:
    fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not NAME.fullmatch(fn["name"]):
        raise bad(f"tools[{i}]", 'expected {"type": "function", "function": {"name": ..., "parameters": {...}}} '
                                 "with a name of letters, digits, _ and - (at most 64)")
    parameters = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise bad(f"tools[{i}].function.parameters", "expected a JSON schema object")
    description = fn.get("description") or ""
    if not isinstance(description, str):
        raise bad(f"tools[{i}].function.description", "expected a string")
    return {"name": fn["name"], "description": description, "parameters": parameters}


def _call_schema(tool: dict) -> dict:
    return {"type": "object", "properties": {"name": {"enum": [tool["name"]]}, "arguments": tool["parameters"]},
            "required": ["name", "arguments"]}


def add_tools(messages: pb.ChatMessages, plan: ToolPlan) -> None:
    """Writes the tools into the system message (a new first one when there is none)."""
    text = SYSTEM.format(tools="\n".join(json.dumps({"type": "function", "function": t}) for t in plan.tools))
    if messages.messages and messages.messages[0].role == "system":
        messages.messages[0].content += "\n\n" + text
    else:
        messages.messages.insert(0, pb.ChatMessage(role="system", content=text))


def calls_as_text(tool_calls, param: str) -> str:
    """An assistant message's earlier tool calls, as the model would have written them."""
    if not isinstance(tool_calls, list):
        raise bad(param, "expected a list of tool calls")
    texts = []
    for i, call in enumerate(tool_calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments", ""), str):
            raise bad(f"{param}[{i}]", 'expected {"function": {"name": ..., "arguments": "<JSON text>"}}')
        try:
            arguments = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            raise bad(f"{param}[{i}].function.arguments", "expected JSON text") from None
        texts.append("<tool_call>\n" + json.dumps({"name": fn["name"], "arguments": arguments}) + "\n</tool_call>")
    return "\n".join(texts)


def parse_calls(plan: ToolPlan, text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a whole answer, read as a stream would read it (tool_stream.py),
    so that a collected answer and a streamed one agree. An answer cut inside a call's
    arguments keeps that call's text as content. Text that is no call stays content."""
    stream = ToolStream(plan.mode == "auto")
    delta = merged(stream.push(text), stream.finish())
    calls = stream.calls[:-1] if stream.cut else stream.calls
    if not calls:
        return text, []
    content = delta.get("content", "") + (CALL_START + stream.block if stream.cut else "")
    return content or None, calls
