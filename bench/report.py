"""The benchmark's markdown: tables with every figure also as a ratio to the null server of the
same run, the machine, and the issue's targets; written between markers into BENCHMARKS.md."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

BEGIN = "<!-- bench:begin (written by `python -m bench`; edits inside are overwritten) -->"
END = "<!-- bench:end -->"
SCENARIOS = {
    "one": "1 image/request, 1 in flight",
    "many": "1 image/request, 64 in flight",
    "batch": "64 images/request, 8 in flight",
}


def machine() -> dict[str, str]:
    """nproc, CPU model, memory, OS and the versions that matter."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    versions = {}
    for dist in ("tensorflow-cpu", "tensorflow", "keras", "grpcio", "protobuf", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    return {
        "nproc": nproc or "?",
        "cpu": model,
        "memory": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
    }


def load_average() -> str:
    """The 1-minute load average, to tell a quiet machine from a busy one."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except (OSError, IndexError):
        return "?"


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or value != value:  # None or NaN
        return "–"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base or value != value:
        return ""
    return f" ({value / base:.2f}×)"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def throughput_table(rows: list[dict[str, Any]]) -> list[str]:
    null = next((r for r in rows if r["kind"] == "null"), None)
    base = null["scenarios"] if null else {}

    def get(row: dict[str, Any], scenario: str, key: str) -> float | None:
        value = row["scenarios"].get(scenario, {}).get(key)
        return None if value is None else float(value)

    lines = [
        "| server | model | workers | 1 in flight: req/s | p50 / p99 ms | p99 × null | "
        "64 in flight: req/s | p50 / p99 ms | 64 images × 8 in flight: images/s | p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [row["name"], row["model"], str(row["workers"])]
        for scenario, key in (("one", "rps"), ("many", "rps"), ("batch", "images_per_s")):
            value = get(row, scenario, key)
            cells.append(_num(value) + _ratio(value, base.get(scenario, {}).get(key)))
            p99 = get(row, scenario, "p99_ms")
            cells.append(f"{_ms(get(row, scenario, 'p50_ms'))} / {_ms(p99)}")
            if scenario == "one":
                null_p99 = base.get("one", {}).get("p99_ms")
                cells.append(f"{p99 / null_p99:.2f}×" if p99 is not None and null_p99 else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def operations_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| server | model | accuracy of the answers | errors | Evaluate 10k: s | "
        "cold start to SERVING: s | RSS per process: MiB | RSS total: MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["kind"] == "h2load":
            continue
        checked = sum(s.get("checked", 0) for s in row["scenarios"].values())
        correct = sum(round(s["accuracy"] * s["checked"]) for s in row["scenarios"].values()
                      if s.get("accuracy") is not None)
        errors: dict[str, int] = {}
        for s in row["scenarios"].values():
            for code, n in s.get("errors", {}).items():
                errors[code] = errors.get(code, 0) + n
        memory = row.get("memory", [])
        per_process = " + ".join(f"{rss:.0f} ({cmd})" for cmd, rss in memory) or "–"
        total = sum(rss for _, rss in memory) if memory else None
        lines.append("| " + " | ".join([
            row["name"], row["model"],
            f"{correct / checked:.4f}" if checked else "–",
            ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "none",
            _num(row.get("evaluate_s"), 2), _num(row.get("cold_start_s"), 2), per_process,
            _num(total),
        ]) + " |")
    return lines


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, each with the measured figure and whether it is met."""
    null = next((r for r in rows if r["kind"] == "null"), None)
    ours = next((r for r in rows if r["kind"] == "ours" and r["preset"] == "seed"
                 and r["workers"] == max(x["workers"] for x in rows if x["kind"] == "ours")), None)
    h2 = next((r for r in rows if r["kind"] == "h2load"), None)
    if null is None or ours is None:
        return []
    n, o = null["scenarios"], ours["scenarios"]

    def check(label: str, value: float | None, limit: float, above: bool = True) -> str:
        if value is None:
            return f"- {label}: not measured"
        met = value >= limit if above else value <= limit
        return f"- {label}: **{value:.3f}** (target {'≥' if above else '≤'} {limit}) {'✓' if met else '✗'}"

    def ratio(a: dict[str, Any], b: dict[str, Any], scenario: str, key: str) -> float | None:
        x, y = a.get(scenario, {}).get(key), b.get(scenario, {}).get(key)
        return x / y if x is not None and y else None

    lines = [f"Targets of issue 3, for `{ours['name']}` with the seed model:", ""]
    lines.append(check("1 image/request, 64 in flight: req/s ÷ null's", ratio(o, n, "many", "rps"), 0.8))
    lines.append(check("1 in flight: p99 ÷ null's p99", ratio(o, n, "one", "p99_ms"), 1.5, above=False))
    lines.append(check("64 images/request, 8 in flight: images/s ÷ null's",
                       ratio(o, n, "batch", "images_per_s"), 0.8))
    lines.append(check("Evaluate of the 10k test set, seconds", ours.get("evaluate_s"), 1.0, above=False))
    if h2 is not None:
        lines.append(check("loadtest ÷ h2load against the null server, 64 in flight",
                           ratio(n, h2["scenarios"], "many", "rps"), 0.7))
    v2 = next((r for r in rows if r["kind"] == "ours-oip"), None)
    for kind, target in (("kserve", 4.0), ("kserve-litert", None)):
        kserve = next((r for r in rows if r["kind"] == kind), None)
        if kserve is None:
            continue
        k = kserve["scenarios"]
        label = f"1 image/request, 64 in flight: req/s ÷ {kserve['name']}'s"
        value = ratio(o, k, "many", "rps")
        if target is not None:
            lines.append(check(label, value, target))
        elif value is not None:  # no target: the serving stacks alone, for comparison
            lines.append(f"- {label}: **{value:.3f}**")
        if v2 is not None and (same := ratio(v2["scenarios"], k, "many", "rps")) is not None:
            lines.append(f"  - both over the V2 protocol (`{v2['name']}`): **{same:.3f}**")
    return lines


def render(rows: list[dict[str, Any]], settings: dict[str, Any], host: dict[str, str]) -> str:
    lines = [
        BEGIN,
        "",
        f"Run of {settings['date']}: `{settings['command']}` — {settings['duration']:g} s per point "
        + (f"(the median of {settings['repeat']} runs of {settings['duration'] / settings['repeat']:g} s, "
           "by throughput) " if settings.get("repeat", 1) > 1 else "")
        + f"after {settings['warmup']:g} s of warm-up, {settings['encoding']} pixels, load tester "
        f"`mnist-client loadtest` with {settings['load']}.",
        "",
        f"Machine: {host['nproc']} CPUs ({host['cpu']}), {host['memory']} RAM, {host['os']}, "
        f"Python {host['python']}; {host['versions']}."
        + (f" {settings['note']}" if settings.get("note") else ""),
        "",
        "Throughput and latency; in brackets the ratio to the null server in this run:",
        "",
        *throughput_table(rows),
        "",
        "Accuracy, errors, Evaluate, cold start and memory:",
        "",
        *operations_table(rows),
        "",
        *targets(rows),
        "",
        END,
    ]
    return "\n".join(lines) + "\n"


def write(path: Path, section: str, header: str) -> None:
    """Replaces the section between the markers in ``path`` (keeping the prose around it), or writes
    ``header`` + section into a new file."""
    if path.is_file():
        text = path.read_text()
        if BEGIN in text and END in text:
            before = text[: text.index(BEGIN)]
            after = text[text.index(END) + len(END) :].lstrip("\n")
            path.write_text(before + section + ("\n" + after if after else ""))
            return
        path.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    path.write_text(header + "\n" + section)
