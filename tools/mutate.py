"""Mutation check of a chapter's SymPy assertions: perturb the formula under each one and see whether it fails.

    python tools/mutate.py notebooks/09_kl_estimators.md [more chapters ...] [--record book/mutation.md]
    make mutate [NB=notebooks/09_kl_estimators.md]

A check must be able to fail. For every ``assert_identity(lhs, rhs, ...)`` call and every ``assert x == y`` in a
cell that uses SymPy, this tool builds *mutants* of the two sides -- the whole side negated or doubled, one ``+``
turned into ``-`` or back, one term dropped, one product turned into a quotient, one unary minus removed, the
operands of one subtraction or the first two arguments of one call swapped -- and runs the check with each mutant
in place of the original. A mutant the check rejects (``AssertionError``) is *killed*; one it accepts *survived*:
either the check cannot see that change of formula, or the mutant is equivalent to the original (``2 * 0 == 0``).
Mutants that raise another exception or run past the time limit are counted apart: they say nothing about the check.

Cost. One driver process runs the chapter's code cells in order (``tools/notebook_code.py`` extracts them). Before a
cell with assertions it forks once per mutant; the child inherits the state of every cell before, runs the cell's
statements up to the mutated one and exits, and the parent then runs the original cell and goes on. So the prefix is
computed once. By default only the first cell (the imports) and the cells that use SymPy are run (``--mode sympy``);
a cell that then fails for want of a training result is reported and its checks are skipped; ``--mode full`` runs
every cell up to the last one with a check.

Equivalent mutants. ``tools/mutants_equivalent.yml`` lists accepted survivors, each with the chapter, the original
and the mutated expression (as this tool prints them) and the reason it is equivalent; they are left out of the
kill rate and listed as accepted. The kill rate is killed / (killed + survivors not accepted).

``--record FILE`` rewrites the chapter's row of the table in FILE (``book/mutation.md``).
"""

from __future__ import annotations

import argparse
import ast
import copy
import datetime
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebook_code import extract_cells  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT_FILE = ROOT / "tools" / "mutants_equivalent.yml"
CHECK_CALLS = {"assert_identity"}
ZERO_LIKE = re.compile(r"^(0|0\.0|sp\.S\.Zero|(sp|torch)\.zeros(_like)?\(.*\))$")
DEFINITIONS = {"sp.Symbol", "sp.symbols", "sp.Rational", "assert_identity", "assert_nonzero", "sp.Matrix.zeros"}
INFINITE = re.compile(r"^-?(sp\.oo|math\.inf|float\('inf'\))$")
TIMEOUT_EXIT, KILLED_EXIT, CRASH_EXIT = 3, 4, 5


# --- building mutants -------------------------------------------------------------------------------------------
def _nodes(tree: ast.AST):
    """Every node of ``tree`` in a fixed order (breadth first), with its position as a path of indices."""
    out, queue = [], [(tree, ())]
    while queue:
        node, path = queue.pop(0)
        out.append((node, path))
        for i, child in enumerate(ast.iter_child_nodes(node)):
            queue.append((child, path + (i,)))
    return out


def _replace(tree: ast.AST, path: tuple[int, ...], new: ast.AST) -> ast.AST:
    """A copy of ``tree`` with the node at ``path`` replaced by ``new``."""
    tree = copy.deepcopy(tree)
    if not path:
        return new
    parent = tree
    for i in path[:-1]:
        parent = list(ast.iter_child_nodes(parent))[i]
    target = list(ast.iter_child_nodes(parent))[path[-1]]
    for name, value in ast.iter_fields(parent):
        if value is target:
            setattr(parent, name, new)
            return tree
        if isinstance(value, list):
            for j, item in enumerate(value):
                if item is target:
                    value[j] = new
                    return tree
    raise RuntimeError("node not found")  # pragma: no cover


def expression_mutants(expr: ast.expr, limit: int, other: str = "", whole: bool = True) -> list[tuple[str, str]]:
    """(operator, mutated source) pairs for one side of a check, at most ``limit``, the whole-side ones first.

    ``other`` is the source of the other side: against 0 (or an infinity) negating or doubling a side is no change.
    """
    src = ast.unparse(expr)
    out: list[tuple[str, str]] = []
    zero = not whole or ZERO_LIKE.match(src) or ZERO_LIKE.match(other)   # x == 0 and -x == 0: the same check
    if not zero:
        out.append(("negate", f"-({src})"))
    if not (zero or INFINITE.match(src) or INFINITE.match(other)):  # 2 * oo == oo
        out.append(("factor 2", f"2 * ({src})"))
    for node, path in _nodes(expr)[: 400]:
        new: list[tuple[str, ast.expr]] = []
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
            flipped = ast.BinOp(node.left, ast.Sub() if isinstance(node.op, ast.Add) else ast.Add(), node.right)
            new.append(("sign of a term", flipped))
            new.append(("drop a term", node.left))
            new.append(("drop a term", node.right if isinstance(node.op, ast.Add)
                        else ast.UnaryOp(ast.USub(), node.right)))
            if isinstance(node.op, ast.Sub):
                new.append(("swap operands", ast.BinOp(node.right, ast.Sub(), node.left)))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
            other = ast.Div() if isinstance(node.op, ast.Mult) else ast.Mult()
            new.append(("product <-> quotient", ast.BinOp(node.left, other, node.right)))
            if isinstance(node.op, ast.Div):
                new.append(("swap operands", ast.BinOp(node.right, ast.Div(), node.left)))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            new.append(("sign of a term", node.operand))
        elif isinstance(node, ast.Call) and len(node.args) >= 2 and not any(
                isinstance(a, ast.Starred) for a in node.args[:2]):
            swapped = copy.copy(node)
            swapped.args = [node.args[1], node.args[0], *node.args[2:]]
            new.append(("swap arguments", swapped))
        for op, replacement in new:
            mutated = ast.unparse(_replace(expr, path, replacement))
            if mutated != src and (op, mutated) not in out:
                out.append((op, mutated))
    return out[:limit]


@dataclass
class Target:
    """One side of one check: where it is, its source, and its mutants."""
    cell: int                 # 1-based cell number
    stmt: int                 # run the cell's top-level statements up to this one (the last check that can see it)
    line: int                 # line of the check within the cell (1-based)
    side: str                 # "lhs" / "rhs"
    original: str             # source of that side
    mutants: list[tuple[str, str]]
    node_path: tuple[int, ...] = field(default=())
    mut_stmt: int = -1        # the statement that is mutated (-1: the same as ``stmt``)


def find_targets(cells: list[str], limit: int) -> list[Target]:
    targets = []
    for ci, code in enumerate(cells, 1):
        if "sp." not in code and "assert_identity" not in code:
            continue
        tree = ast.parse(code)
        for si, stmt in enumerate(tree.body):
            for node, path in _nodes(stmt):
                sides = []
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in CHECK_CALLS
                        and len(node.args) >= 2):
                    sides = [("lhs", (*path, 1)), ("rhs", (*path, 2))]      # child 0 is the function name
                elif isinstance(node, ast.Assert):
                    for sub, sub_path in _nodes(node.test):
                        if (isinstance(sub, ast.Compare) and len(sub.ops) == 1 and isinstance(sub.ops[0], ast.Eq)):
                            full = (*path, 0, *sub_path)
                            sides += [("lhs", (*full, 0)), ("rhs", (*full, 2))]
                for k, (side, side_path) in enumerate(sides):
                    expr = _get(stmt, side_path)
                    other = ast.unparse(_get(stmt, sides[k ^ 1][1]))
                    targets.append(Target(ci, si, node.lineno, side, ast.unparse(expr),
                                          expression_mutants(expr, limit, other), side_path))
        # the formulas the checks are written in: every top-level `name = formula` of the cell that a later check of
        # the same cell reads is mutated too, and the cell is run up to the last such check
        checks = {t.stmt for t in targets if t.cell == ci}
        for si, stmt in enumerate(tree.body):
            if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
                continue
            name = stmt.targets[0].id
            readers = [sj for sj in checks if sj > si and any(
                isinstance(n, ast.Name) and n.id == name for n, _ in _nodes(tree.body[sj]))]
            value = stmt.value
            if not readers or isinstance(value, (ast.Constant, ast.Lambda)) or (
                    isinstance(value, ast.Call) and ast.unparse(value.func) in DEFINITIONS):
                continue                                  # symbols, and checks already mutated above, are skipped
            container = isinstance(value, (ast.List, ast.ListComp, ast.Dict, ast.DictComp, ast.Tuple, ast.GeneratorExp))
            targets.append(Target(ci, max(readers), stmt.lineno, f"{name} =", ast.unparse(value),
                                  expression_mutants(value, limit, whole=not container), (1,), mut_stmt=si))
    return targets


def _get(tree: ast.AST, path: tuple[int, ...]) -> ast.AST:
    node = tree
    for i in path:
        node = list(ast.iter_child_nodes(node))[i]
    return node


# --- running them ---------------------------------------------------------------------------------------------
def _run_child(namespace: dict, stmts: list[ast.stmt], timeout: int) -> int:
    """Fork, run ``stmts`` in a copy of the namespace, return the outcome code."""
    pid = os.fork()
    if pid == 0:                                    # the child: never returns
        code = 0
        try:
            signal.alarm(timeout)
            exec(compile(ast.Module(stmts, []), "<mutant>", "exec"), namespace)
        except AssertionError:
            code = KILLED_EXIT
        except TimeoutError:
            code = TIMEOUT_EXIT
        except BaseException:  # noqa: BLE001  any other failure is a crash, not a kill
            code = CRASH_EXIT
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _on_alarm(signum, frame):
    raise TimeoutError


def load_equivalent(chapter: str, file: Path = EQUIVALENT_FILE) -> list[dict]:
    if not file.exists():
        return []
    entries = yaml.safe_load(file.read_text()) or []
    for e in entries:
        missing = {"chapter", "original", "mutant", "reason"} - set(e)
        if missing:
            raise ValueError(f"{file.name}: entry {e} lacks {sorted(missing)}")
    return [e for e in entries if e["chapter"] == chapter]


def mutate_chapter(path: Path, mode: str = "sympy", limit: int = 12, timeout: int = 60, verbose: bool = False,
                   equivalent_file: Path = EQUIVALENT_FILE) -> dict:
    chapter = path.stem
    cells = extract_cells(path.read_text())
    targets = find_targets(cells, limit)
    by_cell: dict[int, list[Target]] = {}
    for t in targets:
        by_cell.setdefault(t.cell, []).append(t)
    accepted = load_equivalent(chapter, equivalent_file)
    last = max(by_cell, default=0)
    namespace: dict = {"__name__": "__main__"}
    result = {"chapter": chapter, "killed": 0, "survived": [], "accepted": [], "crashed": 0, "timeout": 0,
              "skipped_cells": [], "checks": len(targets)}
    os.chdir(path.parent)                           # notebooks read files relative to their folder
    signal.signal(signal.SIGALRM, _on_alarm)
    start = time.process_time()
    for ci, code in enumerate(cells[:last], 1):
        if mode == "sympy" and ci > 1 and ci not in by_cell and "sp." not in code:
            continue
        tree = ast.parse(code)
        for t in by_cell.get(ci, []):
            for op, mutated in t.mutants:
                stmts = copy.deepcopy(tree.body[: t.stmt + 1])
                new_expr = ast.parse(mutated, mode="eval").body
                where = t.stmt if t.mut_stmt < 0 else t.mut_stmt
                stmts[where] = _replace(stmts[where], t.node_path, new_expr)
                ast.fix_missing_locations(stmts[where])
                outcome = _run_child(namespace, stmts, timeout)
                record = {"cell": ci, "line": t.line, "side": t.side, "op": op, "original": t.original,
                          "mutant": mutated}
                if outcome == KILLED_EXIT:
                    result["killed"] += 1
                elif outcome == 0:
                    match = next((e for e in accepted if e["original"] == t.original and e["mutant"] == mutated),
                                 None)
                    if match:
                        result["accepted"].append(record | {"reason": match["reason"]})
                    else:
                        result["survived"].append(record)
                elif outcome == TIMEOUT_EXIT:
                    result["timeout"] += 1
                else:
                    result["crashed"] += 1
                if verbose:
                    print(f"  cell {ci} line {t.line} {t.side} {op:>20}: exit {outcome}", flush=True)
        try:
            exec(compile(tree, f"<cell {ci}>", "exec"), namespace)
        except Exception as err:  # noqa: BLE001
            if ci in by_cell:
                result["skipped_cells"].append((ci, f"{type(err).__name__}: {err}"[:120]))
            if ci == 1 or mode == "full":
                raise RuntimeError(f"{chapter}: cell {ci} fails without any mutant: {err}") from err
    result["cpu_s"] = time.process_time() - start
    live = result["killed"] + len(result["survived"])
    result["kill_rate"] = result["killed"] / live if live else float("nan")
    return result


def report(r: dict) -> None:
    total = r["killed"] + len(r["survived"]) + len(r["accepted"]) + r["crashed"] + r["timeout"]
    print(f"{r['chapter']}: {r['checks']} check sides, {total} mutants: {r['killed']} killed, "
          f"{len(r['survived'])} survived, {len(r['accepted'])} accepted as equivalent, {r['crashed']} crashed, "
          f"{r['timeout']} timed out; kill rate {100 * r['kill_rate']:.1f}%  ({r['cpu_s']:.0f} s CPU in the driver)")
    for ci, why in r["skipped_cells"]:
        print(f"  cell {ci} skipped (fails in --mode sympy without the cells before it): {why}")
    for s in r["survived"]:
        print(f"  SURVIVED cell {s['cell']} line {s['line']} {s['side']} [{s['op']}]\n"
              f"    original = '{s['original']}'\n    mutant   = '{s['mutant']}'")


TABLE_HEAD = ("| chapter | mutants | killed | survived | accepted equivalent | crashed / timed out | kill rate "
              "| date |\n|---|---|---|---|---|---|---|---|\n")


def record(r: dict, file: Path) -> None:
    total = r["killed"] + len(r["survived"]) + len(r["accepted"]) + r["crashed"] + r["timeout"]
    row = (f"| {r['chapter']} | {total} | {r['killed']} | {len(r['survived'])} | {len(r['accepted'])} | "
           f"{r['crashed']} / {r['timeout']} | {100 * r['kill_rate']:.1f}% | {datetime.date.today().isoformat()} |")
    text = file.read_text()
    if TABLE_HEAD not in text:
        raise ValueError(f"{file} has no mutation table (expected the header {TABLE_HEAD!r})")
    head_end = text.index(TABLE_HEAD) + len(TABLE_HEAD)
    lines, rest = [], text[head_end:]
    while rest.startswith("|"):
        line, _, rest = rest.partition("\n")
        lines.append(line)
    lines = [x for x in lines if not x.startswith(f"| {r['chapter']} |")] + [row]
    lines.sort()
    file.write_text(text[:head_end] + "\n".join(lines) + "\n" + rest)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("chapters", nargs="+", type=Path)
    ap.add_argument("--mode", choices=("sympy", "full"), default="sympy")
    ap.add_argument("--limit", type=int, default=12, help="mutants per side of a check (default 12)")
    ap.add_argument("--timeout", type=int, default=60, help="seconds per mutant (default 60)")
    ap.add_argument("--record", type=Path, help="Markdown file whose table gets one row per chapter")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("RL4LLM_DEVICE", "cpu")
    record_file = args.record.resolve() if args.record else None
    survivors = 0
    for chapter in args.chapters:
        pid = os.fork()                              # one fresh process per chapter: no state leaks between them
        if pid == 0:
            import torch
            torch.set_num_threads(1)                 # forked children and thread pools do not mix
            r = mutate_chapter(chapter.resolve(), args.mode, args.limit, args.timeout, args.verbose)
            report(r)
            if record_file:
                record(r, record_file)
            sys.stdout.flush()
            os._exit(1 if r["survived"] else 0)
        _, status = os.waitpid(pid, 0)
        survivors += os.waitstatus_to_exitcode(status) != 0
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
