"""AUTOMATIC1111's prompt syntax: word weights and prompt editing, parsed into a tree.

- ``(text)`` multiplies the attention weight of its words by 1.1, ``((text))`` by 1.21, ``[text]``
  divides it by 1.1, ``(text:1.3)`` sets it to 1.3 times the enclosing weight;
- ``[before:after:when]`` uses ``before`` until step ``when`` and ``after`` from it on;
  ``[after:when]`` adds ``after`` from ``when`` on; ``[before::when]`` removes ``before`` at ``when``.
  ``when`` is a fraction of the steps if below 1 (step ⌊when·N⌋), else a step index.
- ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\:`` ``\\\\`` are the literal characters.

In a negative prompt, ``[hat:5]`` is therefore the delayed negative of the article: the empty
prompt (ε_∅) before step 5, "hat" from step 5 on — the same as a window ``5:``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from negprompt.errors import NegpromptError
from negprompt.limits import MAX_PROMPT_NESTING, MAX_WEIGHT

EMPHASIS = 1.1


class PromptSyntaxError(NegpromptError):
    """A prompt whose brackets or numbers cannot be read."""


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Weighted:
    children: tuple
    weight: float
    explicit: bool  # written as (text:w) rather than (text) or [text]
    square: bool = False  # [text]: divides by 1.1


@dataclass(frozen=True)
class Edit:
    before: tuple
    after: tuple
    when: float
    form: str  # "replace" [a:b:w], "add" [b:w], "remove" [a::w]


Node = Text | Weighted | Edit
NUMBER = re.compile(r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$")


def parse(prompt: str) -> tuple[Node, ...]:
    """The prompt as a tree; raises :class:`PromptSyntaxError` on unbalanced brackets, brackets nested
    deeper than ``MAX_PROMPT_NESTING`` or a byte that is not UTF-8 (:func:`check_text`)."""
    check_text(prompt)
    _check_nesting(prompt)
    nodes, position = _parse_sequence(prompt, 0, closers="")
    if position != len(prompt):
        raise PromptSyntaxError(f"unexpected {prompt[position]!r} at character {position + 1} of {prompt!r}")
    _check_weights(nodes, prompt)
    return nodes


def check_text(prompt: str) -> None:
    """Raises :class:`PromptSyntaxError` if ``prompt`` holds a byte that was not UTF-8: Python keeps such a
    byte of the command line (or of a file read with ``surrogateescape``) as a lone surrogate, which no
    tokenizer can encode."""
    if prompt.isascii():
        return
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        raw = ord(prompt[error.start]) - 0xDC00 if 0xDC80 <= ord(prompt[error.start]) <= 0xDCFF else None
        what = f"the byte 0x{raw:02x}" if raw is not None else f"the lone surrogate U+{ord(prompt[error.start]):04X}"
        raise PromptSyntaxError(
            f"prompt {_shown(prompt)} holds {what} at character {error.start + 1}, which is not UTF-8 text; "
            "prompts are UTF-8 text"
        ) from None


def _check_nesting(prompt: str) -> None:
    """Raises :class:`PromptSyntaxError` if brackets nest deeper than ``MAX_PROMPT_NESTING`` (checked in one
    pass before the recursive parser, which would otherwise exhaust Python's recursion)."""
    if prompt.count("(") + prompt.count("[") <= MAX_PROMPT_NESTING:
        return
    depth, escaped = 0, False
    for i, c in enumerate(prompt):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c in "([":
            depth += 1
            if depth > MAX_PROMPT_NESTING:
                raise PromptSyntaxError(
                    f"brackets nest deeper than {MAX_PROMPT_NESTING} levels at character {i + 1} of {_shown(prompt)}; "
                    f"at most {MAX_PROMPT_NESTING} (weights multiply, so 15 levels of ( ) already pass the weight bound)"
                )
        elif c in ")]":
            depth = max(depth - 1, 0)


def _shown(prompt: str, limit: int = 80) -> str:
    """``repr(prompt)``, cut to about ``limit`` characters for a one-line message."""
    return repr(prompt) if len(prompt) <= limit else repr(prompt[:limit]) + f"… ({len(prompt)} characters)"


def _check_weights(nodes: tuple[Node, ...], prompt: str, weight: float = 1.0) -> None:
    """Raises :class:`PromptSyntaxError` if a word's effective weight leaves [−MAX_WEIGHT, MAX_WEIGHT]."""
    for node in nodes:
        if isinstance(node, Weighted):
            inner = weight * node.weight
            if abs(inner) > MAX_WEIGHT:
                words = render(node.children).strip() or "(nothing)"
                raise PromptSyntaxError(
                    f"the weight of {words!r} in {prompt!r} is {inner:g} (nested weights multiplied); "
                    f"weights must be within ±{MAX_WEIGHT:g}: beyond, the image turns to noise"
                )
            _check_weights(node.children, prompt, inner)
        elif isinstance(node, Edit):
            _check_weights(node.before, prompt, weight)
            _check_weights(node.after, prompt, weight)


def _parse_sequence(s: str, i: int, closers: str) -> tuple[tuple[Node, ...], int]:
    nodes: list[Node] = []
    buffer: list[str] = []

    def flush() -> None:
        if buffer:
            nodes.append(Text("".join(buffer)))
            buffer.clear()

    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            buffer.append(s[i + 1])
            i += 2
        elif c in closers or (c == ":" and ":" in closers):
            break
        elif c == "(":
            flush()
            node, i = _parse_round(s, i + 1)
            nodes.append(node)
        elif c == "[":
            flush()
            node, i = _parse_square(s, i + 1)
            nodes.append(node)
        elif c in ")]":
            raise PromptSyntaxError(f"unbalanced {c!r} at character {i + 1} of {s!r}: nothing to close")
        else:
            buffer.append(c)
            i += 1
    flush()
    return tuple(nodes), i


def _number(text: str, s: str, where: int) -> float:
    if not NUMBER.match(text):
        raise PromptSyntaxError(f"{text.strip()!r} at character {where + 1} of {s!r} is not a number")
    value = float(text)
    if not math.isfinite(value):
        raise PromptSyntaxError(f"{text.strip()!r} at character {where + 1} of {s!r} is not a finite number")
    return value


def _parse_round(s: str, i: int) -> tuple[Node, int]:
    start = i - 1
    children, i = _parse_sequence(s, i, closers=":)")
    if i >= len(s):
        raise PromptSyntaxError(f"unbalanced '(' at character {start + 1} of {s!r}: add ')'")
    if s[i] == ")":
        return Weighted(children, EMPHASIS, explicit=False), i + 1
    close = s.find(")", i)
    if close < 0:
        raise PromptSyntaxError(f"unbalanced '(' at character {start + 1} of {s!r}: add ')'")
    return Weighted(children, _number(s[i + 1 : close], s, i + 1), explicit=True), close + 1


def _parse_square(s: str, i: int) -> tuple[Node, int]:
    start = i - 1
    first, i = _parse_sequence(s, i, closers=":]")
    if i >= len(s):
        raise PromptSyntaxError(f"unbalanced '[' at character {start + 1} of {s!r}: add ']'")
    if s[i] == "]":
        return Weighted(first, 1 / EMPHASIS, explicit=False, square=True), i + 1
    second, j = _parse_sequence(s, i + 1, closers=":]")
    if j >= len(s):
        raise PromptSyntaxError(f"unbalanced '[' at character {start + 1} of {s!r}: add ']'")
    if s[j] == "]":  # [after:when]
        when = _number(_plain(second, s, i + 1), s, i + 1)
        return Edit((), first, _check_when(when, s, i + 1), "add"), j + 1
    close = s.find("]", j + 1)
    if close < 0:
        raise PromptSyntaxError(f"unbalanced '[' at character {start + 1} of {s!r}: add ']'")
    when = _check_when(_number(s[j + 1 : close], s, j + 1), s, j + 1)
    return Edit(first, second, when, "remove" if not second else "replace"), close + 1


def _plain(nodes: tuple[Node, ...], s: str, where: int) -> str:
    if not all(isinstance(n, Text) for n in nodes):
        raise PromptSyntaxError(f"expected a step number at character {where + 1} of {s!r}")
    return "".join(n.text for n in nodes)


def _check_when(when: float, s: str, where: int) -> float:
    if when < 0:
        raise PromptSyntaxError(f"step {when:g} at character {where + 1} of {s!r} is negative")
    return when


# ---------------------------------------------------------------- rendering and resolving


def _escape(text: str) -> str:
    return re.sub(r"([\\()\[\]:])", r"\\\1", text)


def render(nodes: tuple[Node, ...]) -> str:
    """Writes a tree back as prompt text (``parse(render(t)) == t``)."""
    out = []
    for node in nodes:
        if isinstance(node, Text):
            out.append(_escape(node.text))
        elif isinstance(node, Weighted):
            inner = render(node.children)
            if node.explicit:
                out.append(f"({inner}:{node.weight!r})")
            elif node.square:
                out.append(f"[{inner}]")
            else:
                out.append(f"({inner})")
        else:
            when = f"{node.when!r}"
            if node.form == "add":
                out.append(f"[{render(node.after)}:{when}]")
            elif node.form == "remove":
                out.append(f"[{render(node.before)}::{when}]")
            else:
                out.append(f"[{render(node.before)}:{render(node.after)}:{when}]")
    return "".join(out)


def switch_step(when: float, num_steps: int) -> int:
    """The step from which an edit's ``after`` part applies."""
    return math.floor(when * num_steps) if when < 1 else int(when)


def resolve(nodes: tuple[Node, ...], step: int, num_steps: int, weight: float = 1.0) -> list[tuple[str, float]]:
    """The prompt at ``step``: (text, weight) chunks, prompt editing applied."""
    chunks: list[tuple[str, float]] = []
    for node in nodes:
        if isinstance(node, Text):
            chunks.append((node.text, weight))
        elif isinstance(node, Weighted):
            chunks += resolve(node.children, step, num_steps, weight * node.weight)
        else:
            part = node.after if step >= switch_step(node.when, num_steps) else node.before
            chunks += resolve(part, step, num_steps, weight)
    merged: list[tuple[str, float]] = []
    for text, w in chunks:
        if merged and merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + text, w)
        elif text:
            merged.append((text, w))
    return merged


def has_syntax(prompt: str) -> bool:
    return any(c in prompt for c in "()[]\\")


def text_at(prompt: str, step: int, num_steps: int) -> str:
    """The prompt at ``step`` with edits applied and weights kept: the key of its embedding."""
    check_text(prompt)
    if not has_syntax(prompt):
        return prompt
    return render_weighted(resolve(parse(prompt), step, num_steps))


def render_weighted(chunks: list[tuple[str, float]]) -> str:
    return "".join(_escape(t) if w == 1.0 else f"({_escape(t)}:{w!r})" for t, w in chunks)


def plain_text(prompt: str) -> str:
    """The words of a prompt without any syntax (every edit's text at its last state)."""
    check_text(prompt)
    if not has_syntax(prompt):
        return prompt
    return "".join(t for t, _ in resolve(parse(prompt), 10**9, 10**9))


def switch_steps(prompt: str, num_steps: int) -> set[int]:
    """Steps at which the prompt's text changes (for checking them against the schedule)."""
    if not has_syntax(prompt):
        return set()
    found: set[int] = set()

    def walk(nodes):
        for node in nodes:
            if isinstance(node, Weighted):
                walk(node.children)
            elif isinstance(node, Edit):
                found.add(switch_step(node.when, num_steps))
                walk(node.before)
                walk(node.after)

    walk(parse(prompt))
    return found
