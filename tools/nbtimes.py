"""pytest plugin: print how long each notebook took under nbval (the budget is 120 s per notebook).

Loaded with ``-p tools.nbtimes``. Timing is reported, never asserted: machines are noisy. With pytest-xdist
(``make nbval`` runs two notebooks at a time) the per-notebook times are measured while another notebook shares the
machine, so they are longer than a notebook run alone; the last line is the sum, not the wall time.
"""

from __future__ import annotations

from collections import defaultdict

BUDGET_S = 120.0
_times: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report):
    if report.nodeid.split("::")[0].endswith(".ipynb"):
        _times[report.nodeid.split("::")[0]] += report.duration


def pytest_terminal_summary(terminalreporter):
    if not _times:
        return
    tr = terminalreporter
    tr.section("notebook execution times")
    for path, seconds in sorted(_times.items()):
        flag = "" if seconds <= BUDGET_S else f"   over the {BUDGET_S:.0f} s budget"
        tr.write_line(f"{path:<45} {seconds:7.1f} s{flag}")
    tr.write_line(f"{'all notebooks':<45} {sum(_times.values()):7.1f} s")
