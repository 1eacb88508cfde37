"""What the side-by-side bench makes of its runs: medians, ratios to Istio's pair, the
issue's targets, a Markdown table and PNG plots (matplotlib, the ``bench`` extra)."""

from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from typing import Any

BASELINE = "istio"

#: (what, mode, n, listeners, the most zds's ratio to Istio's pair may be)
RATIO_TARGETS = [
    ("snapshot, N=1,000, listeners", "snapshot", 1000, True, 1.0),
    ("live, N=1,000, listeners", "live", 1000, True, 1.0),
    ("snapshot, N=1,000, no listeners", "snapshot", 1000, False, 1.5),
    ("live, N=1,000, no listeners", "live", 1000, False, 1.5),
    ("snapshot, N=200, listeners", "snapshot", 200, True, 1.5),
    ("live, N=200, listeners", "live", 200, True, 1.5),
]


def to_json(doc: dict[str, Any]) -> str:
    """The results as JSON, one key a line, a list of numbers on one line (not a number a line)."""
    text = json.dumps(doc, indent=1)
    return (
        re.sub(r"\[\s*([-0-9.e,\s]+?)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
        + "\n"
    )


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def at(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]

    return {
        "p50": at(50),
        "p90": at(90),
        "p99": at(99),
        "max": ordered[-1],
        "mean": round(statistics.fmean(values), 1),
    }


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (mode, n, listeners, pair): the median wall time, every run's, the ratio."""
    groups: dict[tuple[str, int, bool, str], list[float]] = defaultdict(list)
    for r in results:
        groups[r["mode"], r["n"], r["listeners"], r["pair"]].append(r["wall_ms"])
    medians = {key: statistics.median(walls) for key, walls in groups.items()}
    rows = []
    for (mode, n, listeners, pair), walls in sorted(groups.items()):
        base_mode = "snapshot" if mode == "floor" else mode
        base = medians.get((base_mode, n, listeners, BASELINE))
        if mode == "floor":  # the floor does one thing: compare it with Istio's live bulk path
            base = medians.get(("live", n, listeners, BASELINE))
        median = medians[mode, n, listeners, pair]
        rows.append(
            {
                "mode": mode,
                "n": n,
                "listeners": listeners,
                "pair": pair,
                "median_ms": round(median, 2),
                "runs_ms": walls,
                "ratio": round(median / base, 3) if base else None,
            }
        )
    return rows


def targets(
    summary: list[dict[str, Any]], results: list[dict[str, Any]], first_request: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The issue's targets, each with what was measured and whether it is met (None: not measured)."""
    by_key = {(r["mode"], r["n"], r["listeners"], r["pair"]): r for r in summary}
    out: list[dict[str, Any]] = []
    for what, mode, n, listeners, limit in RATIO_TARGETS:
        row = by_key.get((mode, n, listeners, "zds"))
        ratio = row["ratio"] if row else None
        out.append(
            {
                "target": f"ratio to Istio's pair, {what}",
                "limit": limit,
                "value": ratio,
                "met": None if ratio is None else ratio <= limit,
            }
        )
    zds = [r for r in results if r["pair"] == "zds"]
    hello = [r["hello_ms"] for r in zds if "hello_ms" in r]
    startup = [("zds ztunnel: exec to hello (ms, median)", hello, 150.0)]
    for n in sorted({r["n"] for r in first_request}):
        values = [r["first_request_ms"] for r in first_request if r["n"] == n]
        startup.append((f"zds pod add, N={n:,}: exec to first request (ms, median)", values, 120.0))
    if not first_request:  # not measured (no live mode, or no zds node agent): said so
        startup.append(("zds pod add: exec to first request (ms, median)", [], 120.0))
    for what, values, limit in startup:
        value = round(statistics.median(values), 1) if values else None
        out.append(
            {"target": what, "limit": limit, "value": value, "met": None if value is None else value <= limit}
        )
    biggest = max((r["n"] for r in zds), default=0)
    at_max = [r for r in zds if r["n"] == biggest and r["listeners"] and r.get("rss_kb")]
    for role, limit in (("server", 80.0), ("ztunnel", 150.0)):
        values = [r["rss_kb"][role]["VmRSS"] / 1024 for r in at_max]
        value = round(max(values), 1) if values else None
        out.append(
            {
                "target": f"RSS of zds {role} at N={biggest:,}, listeners (MB, largest of the runs)",
                "limit": limit,
                "value": value,
                "met": None if value is None or biggest < 2500 else value <= limit,
            }
        )
    return out


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    ratio = f" (x{row['ratio']:.2f})" if row["ratio"] is not None and row["pair"] != BASELINE else ""
    return f"{row['median_ms']:,.1f}{ratio}"


def markdown(doc: dict[str, Any], plots: list[str]) -> str:
    m = doc["machine"]
    pairs: list[str] = list(doc["pairs"])
    floors = sorted({r["pair"] for r in doc["summary"] if r["mode"] == "floor"})
    lines = [
        "# zds side by side with Istio's own ZDS code",
        "",
        f"Command: `{doc['command']}` (as root)  ",
        f"Machine: {m['os']}, kernel {m['kernel']}, {m['cpus']} x {m['cpu']}, {m['memory_mb']:,} MB, "
        f"Python {m['python']}, uvloop {m['uvloop']}, RLIMIT_NOFILE {m['fd_limit']:,}  ",
        f"zds {m['zds_commit']}; Istio {m['istio_commit'] or '-'}; ztunnel {m['ztunnel_commit'] or '-'}  ",
        f"{doc['started']} to {doc['finished']}; load average {doc['load_start'][0]:.2f} at the start, "
        f"{doc['load_end'][0]:.2f} at the end (each run's is in the JSON)"
        + (
            f"  \nBeside it: another process keeping one CPU busy {busy}% of the time (`--busy-beside`)"
            if (busy := doc["config"].get("busy_beside_pct"))
            else ""
        ),
        "",
        "Median of each configuration's runs, in ms; in parentheses the ratio to Istio's pair "
        "(Istio's node agent + Istio's fake ztunnel) in the same run. "
        "snapshot: from starting the ztunnel side to its acked SnapshotSent, N pods preloaded; "
        "live: from handing the node agent N enrollments through its bulk path (zds: one "
        "`zds pod add --from-file`, start-up included) to the last acked one. "
        "C floor: `zds-limit` (one process pair in C, one ZDS exchange per pod, proto or with "
        "3 listeners), its ratio to Istio's live bulk path.",
        "",
    ]
    for s in doc["skipped"]:
        lines.append(f"- {s}")
    if doc["skipped"]:
        lines.append("")
    by_key = {(r["mode"], r["n"], r["listeners"], r["pair"]): r for r in doc["summary"]}
    labels = doc["pairs"]
    header = ["bench", "N", "listeners", *(labels[p] for p in pairs), *(f"C floor ({f[6:]})" for f in floors)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for mode in doc["config"]["modes"]:
        for n in doc["config"]["sizes"]:
            for listeners in (True, False):
                if not any(by_key.get((mode, n, listeners, p)) for p in pairs):
                    continue
                cells = [_cell(by_key.get((mode, n, listeners, p))) for p in pairs]
                cells += [
                    _cell(by_key.get(("floor", n, f == "floor-listen", f)))
                    if listeners == (f == "floor-listen")
                    else "-"
                    for f in floors
                ]
                lines.append(
                    f"| {mode} | {n:,} | {'on' if listeners else 'off'} | " + " | ".join(cells) + " |"
                )
    lines += [
        "",
        "## Targets (zds server + zds ztunnel, uvloop, rules off)",
        "",
        "| target | limit | measured | met |",
        "|---|---|---|---|",
    ]
    for t in doc["targets"]:
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        value = "-" if t["value"] is None else t["value"]
        lines.append(f"| {t['target']} | {t['limit']} | {value} | {met} |")
    if doc.get("first_request"):
        lines += [
            "",
            "## `zds pod add --from-file`: its start-up",
            "",
            "From exec to its first request, as a stand-in control server in the bench process "
            "receives it (`firstrequest.py`: nothing of the node agent's in it), and to its exit "
            "(every pod answered at once by the stand-in); beside them, from the live runs with "
            "zds's node agent, exec to the node agent's first `pod enrolled` line (after its "
            "first request and first enrollment). Medians of the runs, ms.",
            "",
            "| N | exec to first request | exec to exit (stand-in) | exec to first `pod enrolled` (live, listeners on) |",
            "|---|---|---|---|",
        ]
        enrolled: dict[int, list[float]] = defaultdict(list)
        for r in doc["results"]:
            if r["pair"] == "zds" and r["listeners"] and "first_enrolled_ms" in r:
                enrolled[r["n"]].append(r["first_enrolled_ms"])
        for n in sorted({r["n"] for r in doc["first_request"]}):
            rows = [r for r in doc["first_request"] if r["n"] == n]
            first = statistics.median(r["first_request_ms"] for r in rows)
            ended = statistics.median(r["exit_ms"] for r in rows)
            live = f"{statistics.median(enrolled[n]):.1f}" if enrolled[n] else "-"
            lines.append(f"| {n:,} | {first:.1f} | {ended:.1f} | {live} |")
    lines += [
        "",
        "## Footprint after each run (zds, median of the runs)",
        "",
        "| bench | N | listeners | node agent RSS MB | ztunnel RSS MB | ztunnel fds |",
        "|---|---|---|---|---|---|",
    ]
    foot: dict[tuple[str, int, bool], list[dict[str, Any]]] = defaultdict(list)
    for r in doc["results"]:
        if r["pair"] == "zds" and r.get("rss_kb"):
            foot[r["mode"], r["n"], r["listeners"]].append(r)
    for (mode, n, listeners), rows in sorted(foot.items()):
        srv = statistics.median(r["rss_kb"]["server"]["VmRSS"] for r in rows) / 1024
        zt = statistics.median(r["rss_kb"]["ztunnel"]["VmRSS"] for r in rows) / 1024
        fds = statistics.median(r["fds"]["ztunnel"] for r in rows)
        lines.append(
            f"| {mode} | {n:,} | {'on' if listeners else 'off'} | {srv:.1f} | {zt:.1f} | {fds:,.0f} |"
        )
    lines += cpu_table(doc)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def cpu_table(doc: dict[str, Any]) -> list[str]:
    """The CPU each pair's processes used in the timed section, and the machine's steal:
    what a run on 2 vCPUs has to go round, and how much of it the hypervisor kept."""
    groups: dict[tuple[str, int, bool, str], list[dict[str, Any]]] = defaultdict(list)
    for r in doc["results"]:
        if r.get("cpu_ms"):
            groups[r["mode"], r["n"], r["listeners"], r["pair"]].append(r)
    if not groups:
        return []
    cpus = doc.get("machine", {}).get("cpus") or 1
    lines = [
        "",
        "## CPU in the timed section (median of the runs, ms) and the machine's steal",
        "",
        "User and system time from `/proc/PID/stat` (to the clock tick, 10 ms): the node agent "
        "and the ztunnel side over the timed section (snapshot: the ztunnel side's whole life "
        "to its acked SnapshotSent), `zds pod add` over its life to its last line; steal: the "
        f"share of all {cpus} CPUs' time the hypervisor gave to others meanwhile (also in ticks: "
        f"over a run of 100 ms, {10 * cpus} of them, so one tick is {10 / cpus:g}%).",
        "",
        "| bench | N | listeners | pair | node agent | ztunnel side | `zds pod add` | steal % |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def median(rows: list[dict[str, Any]], role: str) -> str:
        values = [r["cpu_ms"][role] for r in rows if role in r["cpu_ms"]]
        return f"{statistics.median(values):.0f}" if values else "-"

    for (mode, n, listeners, pair), rows in sorted(groups.items()):
        steals = [r["steal_pct"] for r in rows if r.get("steal_pct") is not None]
        steal = f"{statistics.median(steals):.1f}" if steals else "-"
        cells = [median(rows, role) for role in ("server", "ztunnel", "client")]
        lines.append(
            f"| {mode} | {n:,} | {'on' if listeners else 'off'} | {doc['pairs'][pair]} | "
            + " | ".join(cells)
            + f" | {steal} |"
        )
    return lines


#: The four panels of each plot: (bench, listeners).
PANELS = (("snapshot", True), ("snapshot", False), ("live", True), ("live", False))


def plots(doc: dict[str, Any], stem: str) -> list[str]:
    """Time vs N per pair (one panel per bench and listener setting) and the per-pod time
    distribution at N=1,000 with listeners; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for ax, (mode, listeners) in zip(axes.flat, PANELS, strict=True):
        for pair in [*doc["pairs"], "floor-listen" if listeners else "floor-proto"]:
            rows = sorted(
                (
                    r
                    for r in doc["summary"]
                    if r["pair"] == pair and r["listeners"] == listeners and r["mode"] in (mode, "floor")
                ),
                key=lambda r: r["n"],
            )
            if rows:
                label = doc["pairs"].get(pair, f"C floor ({pair[6:]})")
                ax.plot([r["n"] for r in rows], [r["median_ms"] for r in rows], marker="o", label=label)
        ax.set_title(f"{mode}, listeners {'on' if listeners else 'off'}")
        ax.set_xlabel("pods (N)")
        ax.set_ylabel("ms (median)")
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Time vs N (lower is better)")
    made.append(_save(plt, fig, stem + "-time-vs-n.png"))

    samples = [r for r in doc["results"] if r.get("acked_all_ms")]
    if samples:
        fig, axes = plt.subplots(2, 2, figsize=(11, 8))
        for ax, (mode, listeners) in zip(axes.flat, PANELS, strict=True):
            for r in samples:
                if (r["mode"], r["listeners"]) != (mode, listeners):
                    continue
                xs = r["acked_all_ms"]
                ax.plot(
                    xs,
                    [(i + 1) / len(xs) for i in range(len(xs))],
                    label=doc["pairs"].get(r["pair"], r["pair"]),
                )
            ax.set_title(f"{mode}, N=1,000, listeners {'on' if listeners else 'off'}")
            ax.set_xlabel("ms from the start until the pod was acked")
            ax.set_ylabel("fraction of the pods")
            ax.grid(True, alpha=0.3)
        axes.flat[0].legend(fontsize=7)
        fig.suptitle("Per pod: when each pod was served (run 1; zds's lines come in ~5 ms batches)")
        made.append(_save(plt, fig, stem + "-per-pod.png"))
    return made


def _save(plt: Any, fig: Any, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
