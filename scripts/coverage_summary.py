"""Coverage per component from the last test run's data (`.coverage`, written by pytest-cov with
the components' own processes combined in), one line each, then the total.

python scripts/coverage_summary.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import coverage
from coverage.exceptions import NoDataError

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ("controlplane", "dataplane", "workeragent", "loraplane")


def main() -> int:
    cov = coverage.Coverage(data_file=str(ROOT / ".coverage"), config_file=str(ROOT / "pyproject.toml"))
    cov.load()
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        try:  # the JSON report lists the components' files that never ran, too
            cov.json_report(outfile=out.name)
        except NoDataError:
            print("coverage: no data", file=sys.stderr)
            return 1
        files = json.loads(Path(out.name).read_text())["files"]
    totals = {c: [0, 0] for c in COMPONENTS}  # statements, missed
    for name, report in files.items():
        component = Path(name).parts[0]
        if component in totals:
            totals[component][0] += report["summary"]["num_statements"]
            totals[component][1] += report["summary"]["missing_lines"]
    print(f"{'coverage':<14}{'statements':>11}{'missed':>8}{'covered':>9}")
    totals["total"] = [sum(t[0] for t in totals.values()), sum(t[1] for t in totals.values())]
    for component, (statements, missed) in totals.items():
        share = 100 * (statements - missed) / statements if statements else 100.0
        print(f"{component:<14}{statements:>11}{missed:>8}{share:>8.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
