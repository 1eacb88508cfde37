"""What ``zds check`` reports: one result per check, each failure with its findings.

A finding says what happened, shows the exact bytes that were sent or received
(hex), and the check it belongs to says the rule and where in Istio's or
ztunnel's source it comes from. Three renderings of one report: a human
summary, JSON (``--json FILE``) and JUnit XML (``--junit FILE``) for CI systems.
"""

from __future__ import annotations

import enum
import json
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

from zds.check.sources import Source
from zds.errors import printable

#: Bytes shown in full up to this many; longer ones are cut in the human summary (never in JSON).
HEX_SHOWN = 96

#: Both checkers read a connection this long more before they close it: a record the other end
#: sends unasked right after its last word (a hello, an answer, SnapshotSent) is judged too.
CLOSE_LINGER = 0.1


class Status(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    #: Not run: left out with --only/--skip, or nothing to run it against (the reason says which).
    SKIP = "skip"
    #: The check itself could not run to the end (the reason says why); counts as not held.
    ERROR = "error"


@dataclass(frozen=True)
class CheckSpec:
    """A check: its name (for --only/--skip), what it verifies, the rule, and its sources."""

    name: str
    description: str
    rule: str
    sources: tuple[Source, ...]


@dataclass
class Finding:
    """One departure from a rule, with the evidence."""

    message: str
    #: Which connection of the check's and which record on it ("conn 2, record 4").
    where: str = ""
    sent: bytes | None = None
    received: bytes | None = None
    #: More lines for the human summary (fds, timings, what was expected).
    detail: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"message": self.message}
        if self.where:
            doc["where"] = self.where
        if self.sent is not None:
            doc["sent_hex"] = self.sent.hex()
        if self.received is not None:
            doc["received_hex"] = self.received.hex()
        if self.detail:
            doc["detail"] = list(self.detail)
        return doc


@dataclass
class CheckResult:
    spec: CheckSpec
    status: Status
    findings: list[Finding] = field(default_factory=list)
    #: What was observed (the evidence a passing check rests on), or why it was skipped.
    notes: list[str] = field(default_factory=list)
    duration: float = 0.0

    @property
    def held(self) -> bool:
        return self.status is Status.PASS

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "description": self.spec.description,
            "status": self.status.value,
            "rule": self.spec.rule,
            "sources": [s.as_dict() for s in self.spec.sources],
            "findings": [f.as_dict() for f in self.findings],
            "notes": list(self.notes),
            "duration_seconds": round(self.duration, 3),
        }


@dataclass
class Report:
    """Every check's result for one ``zds check`` run."""

    command: str
    target: str
    results: list[CheckResult] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    #: Lines about the run itself (the agent's pid, the ztunnel command, what was cleaned up).
    context: list[str] = field(default_factory=list)
    #: time.monotonic() at the start, and at the end once ``finish`` was called.
    clock_started: float = field(default_factory=time.monotonic)
    clock_finished: float | None = None

    def finish(self) -> None:
        """The run is over: what it took is fixed here."""
        self.clock_finished = time.monotonic()

    @property
    def elapsed(self) -> float:
        """The run's wall time (so far, before ``finish``). Not the checks' durations added up:
        the checks one scenario exercises each have that scenario's whole time."""
        return (time.monotonic() if self.clock_finished is None else self.clock_finished) - self.clock_started

    def count(self, status: Status) -> int:
        return sum(1 for r in self.results if r.status is status)

    @property
    def ok(self) -> bool:
        """Every check that ran held, and none errored."""
        return all(r.status in (Status.PASS, Status.SKIP) for r in self.results)

    def summary_line(self) -> str:
        return (
            f"{len(self.results)} checks: {self.count(Status.PASS)} passed, {self.count(Status.FAIL)} failed, "
            f"{self.count(Status.ERROR)} errors, {self.count(Status.SKIP)} skipped"
        )

    # -- renderings ------------------------------------------------------------------
    def render_text(self) -> str:
        lines = [f"zds check {self.command}: {self.target}", *(f"  {c}" for c in self.context), ""]
        width = max((len(r.spec.name) for r in self.results), default=0)
        for result in self.results:
            tag = result.status.value.upper()
            first = (
                result.notes[0]
                if result.notes and result.status is not Status.FAIL
                else result.spec.description
            )
            if result.status is Status.FAIL and result.findings:
                first = (
                    result.findings[0].message
                    if len(result.findings) == 1
                    else f"{len(result.findings)} findings"
                )
            lines.append(f"{tag:<5} {result.spec.name:<{width}}  {first}")
            if result.status in (Status.FAIL, Status.ERROR):
                lines.extend(_failure_lines(result))
        lines += ["", self.summary_line()]
        # (a peer's text, a uid it sent, an error it wrote: escaped, as zds's other tables)
        return "\n".join(printable(line) for line in lines) + "\n"

    def as_dict(self) -> dict[str, Any]:
        return {
            "command": f"zds check {self.command}",
            "target": self.target,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "context": list(self.context),
            "ok": self.ok,
            "summary": {s.value: self.count(s) for s in Status},
            "checks": [r.as_dict() for r in self.results],
        }

    def render_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2) + "\n"

    def render_junit(self) -> str:
        suite = ET.Element(
            "testsuite",
            name=f"zds check {self.command}",
            tests=str(len(self.results)),
            failures=str(self.count(Status.FAIL)),
            errors=str(self.count(Status.ERROR)),
            skipped=str(self.count(Status.SKIP)),
            time=f"{self.elapsed:.3f}",
            timestamp=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.started)),
        )
        props = ET.SubElement(suite, "properties")
        ET.SubElement(props, "property", name="target", value=_xml(self.target))
        for result in self.results:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"zds.check.{self.command.replace('-', '_')}",
                name=result.spec.name,
                time=f"{result.duration:.3f}",
            )
            body = _xml(
                "\n".join(_failure_lines(result, indent="")) if result.findings else "\n".join(result.notes)
            )
            if result.status is Status.FAIL:
                message = _xml(result.findings[0].message if result.findings else result.spec.rule)
                ET.SubElement(case, "failure", message=message, type=result.spec.name).text = body
            elif result.status is Status.ERROR:
                message = _xml(result.notes[0] if result.notes else "error")
                ET.SubElement(case, "error", message=message).text = body
            elif result.status is Status.SKIP:
                ET.SubElement(case, "skipped", message=_xml(result.notes[0] if result.notes else "skipped"))
            else:
                ET.SubElement(case, "system-out").text = _xml(
                    "\n".join([result.spec.description, *result.notes])
                )
        ET.indent(suite)
        return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"


def hex_block(data: bytes, *, limit: int | None = HEX_SHOWN) -> str:
    """``0a 2d 0a 0b ...`` (bytes in pairs), cut after ``limit`` bytes with the total said."""
    shown = data if limit is None or len(data) <= limit else data[:limit]
    text = shown.hex(" ")
    if len(shown) < len(data):
        text += f" ... ({len(data)} bytes in all)"
    return text or "(0 bytes)"


#: What XML 1.0 cannot hold (control characters but tab and line breaks, lone surrogates, U+FFFE
#: and U+FFFF): ElementTree writes them as they are, and the file no longer parses.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml(text: str) -> str:
    """``text`` with what XML cannot hold written as its escape (a peer's uid, its error text)."""
    return _NOT_XML.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _failure_lines(result: CheckResult, indent: str = "      ") -> list[str]:
    lines = [f"{indent}rule: {result.spec.rule}"]
    for finding in result.findings:
        where = f"{finding.where}: " if finding.where else ""
        lines.append(f"{indent}- {where}{finding.message}")
        if finding.sent is not None:
            lines.append(f"{indent}  sent ({len(finding.sent)} bytes): {hex_block(finding.sent)}")
        if finding.received is not None:
            lines.append(f"{indent}  received ({len(finding.received)} bytes): {hex_block(finding.received)}")
        lines.extend(f"{indent}  {d}" for d in finding.detail)
    if result.status is Status.ERROR:
        lines.extend(f"{indent}{n}" for n in result.notes[1:])
    lines.extend(f"{indent}source: {s}" for s in result.spec.sources)
    return lines


def verdict(
    spec: CheckSpec,
    *,
    findings: list[Finding],
    notes: list[str],
    exercised: int,
    duration: float,
    error: str | None = None,
    skipped: str | None = None,
    evidence: str = "",
) -> CheckResult:
    """One check's result: skipped, failed (findings), errored, or passed — and a check that
    found nothing but was never exercised errors: no check holds vacuously."""
    if skipped is not None:
        return CheckResult(spec, Status.SKIP, notes=[skipped], duration=duration)
    if findings:
        return CheckResult(spec, Status.FAIL, list(findings), list(notes), duration)
    if error is not None:
        return CheckResult(spec, Status.ERROR, notes=[error, *notes], duration=duration)
    if not exercised:
        return CheckResult(
            spec,
            Status.ERROR,
            notes=["not exercised: nothing this check judges happened during the run", *notes],
            duration=duration,
        )
    lines = list(notes)
    if evidence:
        lines.insert(0, f"{exercised} {evidence}")
    return CheckResult(spec, Status.PASS, notes=lines, duration=duration)
