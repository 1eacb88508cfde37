"""The demo's output: numbered steps, and the children's log lines about the handshake."""

from __future__ import annotations

import json
from typing import Any

#: Words that make a child's log line part of the story.
HANDSHAKE_WORDS = (
    "hello",
    "snapshot",
    "acked",
    "nacked",
    "connected",
    "disconnected",
    "rules",
    "enrolled",
    "removed",
)


class Narrator:
    """Readable, numbered output."""

    def __init__(self, color: bool) -> None:
        self.step = 0
        self.color = color

    def _c(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def title(self, text: str) -> None:
        self.step += 1
        print(f"\n{self._c('1', f'{self.step}. {text}')}", flush=True)

    def say(self, text: str, indent: int = 3) -> None:
        print(" " * indent + text, flush=True)

    def log(self, who: str, text: str) -> None:
        print(f"     {self._c('36', f'[{who}]')} {text}", flush=True)

    def ok(self, text: str) -> None:
        print(f"   {self._c('32', 'ok')} {text}", flush=True)


class LogTail:
    """Reads a child's JSON log lines as they grow; shows the ones about the handshake."""

    def __init__(self, path: str, who: str) -> None:
        self.path = path
        self.who = who
        self._offset = 0

    def new_lines(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self._offset += end
        lines = []
        for raw in data[:end].splitlines():
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                lines.append({"msg": raw.decode(errors="replace"), "level": "info"})
        return lines

    def show(self, narrator: Narrator) -> None:
        """Print the new lines that tell the handshake (and every warning or error)."""
        for line in self.new_lines():
            if is_handshake_line(line):
                extra = " ".join(f"{k}={line[k]}" for k in ("uid", "pod", "conn") if k in line)
                narrator.log(self.who, f"{line.get('msg', '')}  {extra}".rstrip())


def is_handshake_line(line: dict[str, Any]) -> bool:
    text = str(line.get("msg", ""))
    return line.get("level") in ("warning", "error") or any(word in text for word in HANDSHAKE_WORDS)
