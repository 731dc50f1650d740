"""
Print the fault suite's summary table, and optionally keep it in the docs.

::

    python -m tests.faults.report [--dir DIR] [--write-docs docs/reliability.rst]

Reads the rows the scenarios wrote (``DIR``: ``$QUEBERT_FAULTS_SUMMARY_DIR``,
else ``_trial_temp/faults-summary``), prints them as a table, and with
``--write-docs`` replaces the figures between the ``.. faults-figures-begin``
and ``.. faults-figures-end`` comments of that file with an RST table, the
date and a note on the machine.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, List, Mapping, Optional

BEGIN = ".. faults-figures-begin"
END = ".. faults-figures-end"
COLUMNS = ("scenario", "status", "tasks", "succeeded", "duplicates", "lost",
           "recovery s", "duration s")


def load(directory: str) -> List[dict]:
    rows = []
    for path in glob.glob(os.path.join(directory, "*.json")):
        with open(path, encoding="utf-8") as f:
            rows.append(json.load(f))
    rows.sort(key=lambda r: r.get("finished_at") or "")
    return rows


def _value(value: Any) -> str:
    return "-" if value is None else str(value)


def cells(row: Mapping[str, Any]) -> List[str]:
    duplicates = _value(row.get("duplicates"))
    if row.get("duplicate_bound") is not None:
        duplicates += f" (<= {row['duplicate_bound']})"
    recovery = "-" if row.get("recovery_s") is None else f"{row['recovery_s']:.2f}"
    if row.get("recovery_bound_s") is not None:
        recovery += f" (<= {row['recovery_bound_s']:g})"
    return [row["scenario"], row.get("status", "?"), _value(row.get("tasks")),
            _value(row.get("succeeded")), duplicates, _value(row.get("lost")), recovery,
            _value(row.get("duration_s"))]


def text_table(rows: List[dict]) -> str:
    table = [list(COLUMNS)] + [cells(r) for r in rows]
    widths = [max(len(line[c]) for line in table) for c in range(len(COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    total = sum(r.get("duration_s") or 0 for r in rows)
    lines.append(f"total scenario time {total:.0f}s")
    return "\n".join(lines)


def rst_table(rows: List[dict]) -> str:
    table = [list(COLUMNS)] + [cells(r) for r in rows]
    widths = [max(len(line[c]) for line in table) for c in range(len(COLUMNS))]
    rule = "  ".join("=" * w for w in widths)

    def line(values: List[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()

    out = [rule, line(table[0]), rule] + [line(v) for v in table[1:]] + [rule]
    return "\n".join(out)


def _command(*args: str) -> Optional[str]:
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def machine_note() -> str:
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    rabbit = _command("rabbitmqctl", "-q", "version") or "?"
    redis = "?"
    info = _command("redis-cli", "INFO", "server") or ""
    for line in info.splitlines():
        if line.startswith("redis_version:"):
            redis = line.split(":", 1)[1].strip()
    return (f"{os.cpu_count()} CPU(s){' (' + cpu + ')' if cpu else ''}, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"RabbitMQ {rabbit}, Redis {redis}; workers and servers on the same machine")


def docs_section(rows: List[dict]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    total = sum(r.get("duration_s") or 0 for r in rows)
    parts = [BEGIN, "", f"Measured {when} on {machine_note()}.  Scenario time in all: "
             f"{total:.0f} s.", "", rst_table(rows), ""]
    for row in rows:
        what = row.get("recovery") or "-"
        parts.append(f"* ``{row['scenario']}``: {row.get('fault', '')}.  Recovery: {what}."
                     + (f"  {row['notes']}." if row.get("notes") else ""))
    parts += ["", END]
    return "\n".join(parts)


def write_docs(path: str, rows: List[dict]) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start, end = text.find(BEGIN), text.find(END)
    if start == -1 or end == -1 or end < start:
        raise SystemExit(f"{path}: no '{BEGIN}' ... '{END}' section to replace")
    text = text[:start] + docs_section(rows) + text[end + len(END):]
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.report",
                                     description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--dir", default=os.environ.get("QUEBERT_FAULTS_SUMMARY_DIR")
                        or os.path.join("_trial_temp", "faults-summary"))
    parser.add_argument("--write-docs", metavar="RST", default=None)
    options = parser.parse_args(argv)
    rows = load(options.dir)
    if not rows:
        print(f"fault suite: no results in {options.dir}")
        return 0
    print("fault suite summary")
    print(text_table(rows))
    if options.write_docs:
        write_docs(options.write_docs, rows)
        print(f"fault suite: figures written to {options.write_docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
