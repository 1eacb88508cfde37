"""Files of entries, as both ends read their faults files: JSON lines (every line that is
not blank or a ``#`` comment one object) or YAML (a list, or a mapping whose ``key`` holds
one). Each entry comes with where it is (``FILE:LINE`` or ``FILE: entry N``) for the caller's
message about it; whatever is wrong with the file itself is one line (EntryFileError)."""

from __future__ import annotations

import errno
import functools
import json
import os
import stat
from typing import Any

from zds import defaults
from zds.errors import ZdsError

#: A file of entries larger than this is refused before it is read (a faults file is a few lines).
MAX_BYTES = 1024 * 1024


class EntryFileError(ZdsError):
    """The file cannot be read as entries; the message names it, in one line."""


def _yaml_problem(exc: Exception) -> str:
    """PyYAML's error in one line: what, and where (its own text quotes the line, with a caret)."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        context = getattr(exc, "context", None)
        return (
            f"{context + ': ' if context else ''}{problem} (line {mark.line + 1}, column {mark.column + 1})"
        )
    return " ".join(str(exc).split())


def whole_number(value: Any, least: int = 0) -> bool:
    """Whether an entry's ``value`` is a whole number from ``least`` to INT32_MAX as written
    (not a bool, a float or a string: 1.7 was taken for 1, "5" for 5, true for 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and least <= value <= defaults.INT32_MAX


def real_number(value: Any) -> bool:
    """Whether an entry's ``value`` is a number as written (not a bool or a string)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_bounded(path: str, max_bytes: int) -> bytes:
    """At most ``max_bytes`` + 1 bytes of the file at ``path`` (the caller refuses more:
    ``/dev/zero`` was read until memory ran out). A FIFO is opened without waiting for a
    writer (that waited for good) and read to its end; one that gave nothing (no writer yet)
    is an OSError saying so."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        os.set_blocking(fd, True)  # (a FIFO with a writer: read what it writes)
        data = f.read(max_bytes + 1)
        if not data and stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise OSError(errno.ENODATA, "a FIFO that gave nothing (is its writer started?)")
    return data


def read_tls_file(flag: str, path: str) -> bytes:
    """The PEM file the TLS flag ``flag`` names, read bounded (``defaults.TLS_FILE_MAX``: a PEM
    file is a few KiB) as both the node agent's flags and the control client's are; ValueError
    in one line naming the flag when it cannot be read or is bigger."""
    try:
        data = read_bounded(path, defaults.TLS_FILE_MAX)
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from exc
    if len(data) > defaults.TLS_FILE_MAX:
        raise ValueError(f"{flag} {path}: over {defaults.TLS_FILE_MAX // 1024} KiB; a PEM file is a few KiB")
    return data


def read_entries(path: str, *, key: str, what: str, max_entries: int) -> list[tuple[Any, str]]:
    """Every entry of the file at ``path`` with where it is; EntryFileError when the file
    cannot be read, is not JSON lines or YAML, is not a list (``what``: what it lists, for the
    message), or holds more than ``max_entries``."""
    try:
        data = read_bounded(path, MAX_BYTES)
    except OSError as exc:
        raise EntryFileError(f"cannot read {what} file {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_BYTES:
        raise EntryFileError(f"{path}: over {MAX_BYTES // 1024} KiB; a {what} file is a few lines")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EntryFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if lines and all(line.startswith("{") for _, line in lines):
        entries = [(_json_line(line, f"{path}:{n}"), f"{path}:{n}") for n, line in lines]
    else:
        entries = [
            (entry, f"{path}: entry {n}")
            for n, entry in enumerate(yaml_list(text, path, key=key, what=what), 1)
        ]
    if len(entries) > max_entries:
        raise EntryFileError(f"{path}: {len(entries)} {what}s, more than the {max_entries} that can be armed")
    return entries


def _json_line(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise EntryFileError(f"{where}: not valid JSON: {exc.msg}") from exc
    except (ValueError, RecursionError) as exc:  # nested too deep, an integer too long to convert
        raise EntryFileError(f"{where}: JSON that cannot be read: {exc}") from exc


def yaml_list(
    text: str, path: str, *, key: str, what: str, empty_ok: bool = False, ints_as_written: bool = False
) -> list[Any]:
    """The list a YAML file holds (itself, or under ``key``); EntryFileError naming ``path``
    otherwise (``empty_ok``: an empty file is an empty list). ``ints_as_written``: an
    unquoted integer is kept as the text it was written as (YAML 1.1 reads ``0123`` as 83,
    ``1_000`` as 1000, ``1:30`` as 90: a name of digits became another)."""
    import yaml  # only YAML files need it (~10 ms of imports)

    try:
        doc = yaml.load(text, Loader=_loader(ints_as_written))  # (a safe loader, always)
    except yaml.YAMLError as exc:
        raise EntryFileError(f"{path}: neither JSON lines nor valid YAML: {_yaml_problem(exc)}") from exc
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # PyYAML's resolvers raise these on some scalars ("_0b_": int("", 2)); found by fuzzing.
        raise EntryFileError(f"{path}: YAML that cannot be read: {type(exc).__name__}: {exc}") from exc
    if isinstance(doc, dict) and key in doc:
        doc = doc[key]
    if doc is None and empty_ok:
        doc = []
    if not isinstance(doc, list):
        raise EntryFileError(f"{path}: expected a list of {what}s (or {key}: holding one)")
    return doc


@functools.cache
def _loader(ints_as_written: bool) -> Any:
    """PyYAML's safe loader, or one of its kind that keeps integers as they were written."""
    import yaml

    if not ints_as_written:
        return yaml.SafeLoader

    class IntsAsWritten(yaml.SafeLoader):
        pass

    def as_written(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> str:
        return str(loader.construct_scalar(node))

    IntsAsWritten.add_constructor("tag:yaml.org,2002:int", as_written)
    return IntsAsWritten
