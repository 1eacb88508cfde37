"""Editing a CNI network config list in place, byte for byte.

``zds cni install`` appends zds-cni's entry to a conflist's ``plugins`` and
``uninstall`` takes it out again, touching nothing else: not the key order, not
the other plugins, not the indentation or the trailing newline. The edits are
text splices at positions the standard library's JSON decoder reports, so
uninstalling after installing gives back the very bytes that were there.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from json.decoder import scanstring  # type: ignore[attr-defined]  # public, untyped in typeshed
from typing import Any

from zds.errors import ZdsError

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class ConflistError(ZdsError, ValueError):
    """A network config that cannot be edited (not JSON, no plugins list)."""


@dataclass(frozen=True)
class Span:
    start: int
    end: int


def _skip(text: str, i: int) -> int:
    match = _WS.match(text, i)
    return match.end() if match else i


def _expect(text: str, i: int, char: str) -> None:
    if i >= len(text) or text[i] != char:
        raise ConflistError(f"expected {char!r} at offset {i}")


def members(text: str, i: int) -> dict[str, Span]:
    """Where each member's value of the object starting at ``i`` lies."""
    _expect(text, i, "{")
    i = _skip(text, i + 1)
    found: dict[str, Span] = {}
    if text[i : i + 1] == "}":
        return found
    while True:
        _expect(text, i, '"')
        key, i = scanstring(text, i + 1)
        i = _skip(text, i)
        _expect(text, i, ":")
        i = _skip(text, i + 1)
        _, end = _DECODER.raw_decode(text, i)
        found[key] = Span(i, end)
        i = _skip(text, end)
        if text[i : i + 1] == ",":
            i = _skip(text, i + 1)
            continue
        _expect(text, i, "}")
        return found


def elements(text: str, i: int) -> list[Span]:
    """Where each element of the array starting at ``i`` lies."""
    _expect(text, i, "[")
    i = _skip(text, i + 1)
    found: list[Span] = []
    if text[i : i + 1] == "]":
        return found
    while True:
        _, end = _DECODER.raw_decode(text, i)
        found.append(Span(i, end))
        i = _skip(text, end)
        if text[i : i + 1] == ",":
            i = _skip(text, i + 1)
            continue
        _expect(text, i, "]")
        return found


class Conflist:
    """A conflist's text, with its ``plugins`` located."""

    def __init__(self, text: str, where: str) -> None:
        self.text = text
        self.where = where
        try:
            self.doc: dict[str, Any] = json.loads(text)
            if not isinstance(self.doc, dict):
                raise ConflistError("not a JSON object")
            start = _skip(text, 0)
            self._plugins = members(text, start).get("plugins")
        except (ValueError, IndexError) as exc:
            raise ConflistError(f"{where} is not a network config list: {exc}") from exc
        if self._plugins is None or not isinstance(self.doc.get("plugins"), list):
            raise ConflistError(f"{where} has no plugins list")
        self.plugins: list[Any] = self.doc["plugins"]

    @property
    def name(self) -> str:
        return str(self.doc.get("name", ""))

    def _elements(self) -> list[Span]:
        assert self._plugins is not None
        return elements(self.text, self._plugins.start)

    def indices_of(self, plugin_type: str) -> list[int]:
        return [i for i, p in enumerate(self.plugins) if isinstance(p, dict) and p.get("type") == plugin_type]

    def appended(self, entry: dict[str, Any]) -> str:
        """The text with ``entry`` after the last plugin, laid out like the plugins before it."""
        text, spans = self.text, self._elements()
        if not spans:
            raise ConflistError(f"{self.where} has an empty plugins list")
        assert self._plugins is not None
        open_at = self._plugins.start
        line_start = text.rfind("\n", 0, open_at) + 1
        key_indent = text[line_start:open_at][
            : len(text[line_start:open_at]) - len(text[line_start:open_at].lstrip(" \t"))
        ]
        lead = text[open_at + 1 : spans[0].start]
        if "\n" in lead:
            base = lead.rsplit("\n", 1)[1]
            unit = base[len(key_indent) :] if base.startswith(key_indent) and base != key_indent else "  "
            eol = "\r\n" if "\r\n" in lead else "\n"  # (a file with CRLF line ends keeps them)
            body = json.dumps(entry, indent=unit).replace("\n", eol + base)
        else:
            body = json.dumps(entry)
        at = spans[-1].end
        return text[:at] + "," + lead + body + text[at:]

    def without(self, index: int) -> str:
        """The text with plugin ``index`` taken out, with the comma and space that joined it."""
        text, spans = self.text, self._elements()
        if index > 0:
            return text[: spans[index - 1].end] + text[spans[index].end :]
        if len(spans) > 1:
            return text[: spans[0].start] + text[spans[1].start :]
        return text[: spans[0].start] + text[spans[0].end :]
