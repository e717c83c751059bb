"""Run one stage of `make test`, time it, and print a summary at the end.

    python tools/stage.py "unit tests" -- make unit     # run, record time and status, never abort
    python tools/stage.py --summary                     # print the table; exit 1 if any stage failed

Every stage runs even when an earlier one failed, so one CI log shows every problem at once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

RECORD = Path("_build/stages.json")


def _load() -> list[dict]:
    return json.loads(RECORD.read_text()) if RECORD.exists() else []


def main(argv: list[str]) -> int:
    if argv == ["--summary"]:
        stages = _load()
        RECORD.unlink(missing_ok=True)
        print("\n== make test: stages ==")
        for s in stages:
            print(f"  {s['name']:<16} {'ok' if s['rc'] == 0 else 'FAILED':<7} {s['seconds']:7.1f} s")
        total = sum(s["seconds"] for s in stages)
        failed = [s["name"] for s in stages if s["rc"] != 0]
        print(f"  {'total':<16} {'':<7} {total:7.1f} s")
        if failed:
            print(f"FAILED stages: {', '.join(failed)}")
            return 1
        return 0
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    name, cmd = argv[0], argv[2:]
    stages = [s for s in _load() if s["name"] != name]
    print(f"\n== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    stages.append({"name": name, "rc": rc, "seconds": time.perf_counter() - t0})
    RECORD.parent.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps(stages))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
