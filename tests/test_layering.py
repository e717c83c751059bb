"""The package's layering, read from the source: imports point down the tiers, and stay at module top.

Rules (CONTRIBUTING.md, "Layout"):

1. every module of ``src/rl4llm`` has a tier and a place in its tier (``TIERS``);
2. a module imports another package module only from a lower tier, or from an earlier module of its own tier;
3. the import graph has no cycle;
4. no import of any kind inside a function or class body (all imports at module top);
5. no private name (``_x``) of one package module is used by another (the private module ``_validate`` is the
   shared floor: importing it is allowed, its names are public);
6. gymnasium is imported only by :mod:`rl4llm.envs`, so the language-model half never loads it.

Run as a script on another tree to see what it finds there: ``python tests/test_layering.py path/to/src/rl4llm``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "rl4llm"

TIERS: dict[int, list[str]] = {
    0: ["_validate", "device", "checks", "stored"],
    1: ["nets", "envs", "returns", "kl", "surrogate", "mdp", "dp", "token_mdp", "lm"],
    2: ["td", "pg", "baselines", "actor_critic", "ppo", "trpo", "dqn", "tasks", "reward_model", "rlhf", "dpo", "grpo",
        "offpolicy", "sac"],
}
RANK = {m: (tier, i) for tier, mods in TIERS.items() for i, m in enumerate(mods)}
GYMNASIUM_ALLOWED = {"envs"}


def _package_target(node: ast.ImportFrom | ast.Import) -> list[tuple[str, list[str]]]:
    """``[(module, [imported names])]`` for the package modules an import statement reaches."""
    out = []
    if isinstance(node, ast.Import):
        for a in node.names:
            if a.name.startswith("rl4llm."):
                out.append((a.name.split(".")[1], []))
    elif node.module == "rl4llm" and node.level == 0:
        out += [(a.name, []) for a in node.names]              # from rl4llm import x [as y]
    elif node.module and node.module.startswith("rl4llm.") and node.level == 0:
        out.append((node.module.split(".")[1], [a.name for a in node.names]))
    return out


def violations(src: Path) -> list[str]:
    """Every broken rule in the package at ``src``, one line each (empty: the layering holds)."""
    found: list[str] = []
    graph: dict[str, set[str]] = {}
    for path in sorted(src.glob("*.py")):
        mod = path.stem
        if mod == "__init__":
            continue
        if mod not in RANK:
            found.append(f"{mod}: not in TIERS (give the new module a tier and a place)")
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[mod] = set()
        aliases: dict[str, str] = {}                          # local name -> package module
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            where = f"{mod}:{node.lineno}"
            if id(node) not in top:
                found.append(f"{where}: import inside a function or class body")
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(m == "gymnasium" or m.startswith("gymnasium.") for m in mods) and mod not in GYMNASIUM_ALLOWED:
                found.append(f"{where}: imports gymnasium (only {sorted(GYMNASIUM_ALLOWED)} may)")
            for target, names in _package_target(node):
                graph[mod].add(target)
                if target in RANK and mod in RANK and RANK[target] >= RANK[mod]:
                    found.append(f"{where}: upward import of {target} (tier {RANK[target][0]}) "
                                 f"from {mod} (tier {RANK[mod][0]})")
                for n in names:
                    if n.startswith("_"):
                        found.append(f"{where}: private name {target}.{n} used across modules")
                if isinstance(node, ast.ImportFrom) and node.module == "rl4llm":
                    for a in node.names:
                        aliases[a.asname or a.name] = a.name
        for node in ast.walk(tree):                           # x._private through an imported module
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")):
                found.append(f"{mod}:{node.lineno}: private name {aliases[node.value.id]}.{node.attr} "
                             "used across modules")
    found += [f"cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One representative path per cycle found by depth-first search."""
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return cycles


def test_the_package_is_layered():
    assert violations(SRC) == []


def test_every_module_is_a_declared_submodule():
    import rl4llm

    public = [m for tier in TIERS.values() for m in tier if not m.startswith("_")]
    assert list(rl4llm.SUBMODULES) == public
    assert sorted(p.stem for p in SRC.glob("*.py") if p.stem != "__init__") == sorted(RANK)


def test_the_checker_catches_each_kind_of_violation(tmp_path):
    """Each rule fails on a tree built to break it (a check must be able to fail)."""
    files = {
        "device.py": "from rl4llm.pg import reinforce\n",                       # upward
        "kl.py": "from rl4llm.lm import _private\n",                            # private (and kl < lm: allowed)
        "lm.py": "def f():\n    import rl4llm.kl\n",                            # function-level
        "pg.py": "from rl4llm import baselines\n",                              # upward inside tier 2 ...
        "baselines.py": "from rl4llm import pg\nx = pg._helper\n",               # ... and a cycle, private attr
        "grpo.py": "import gymnasium as gym\n",                                 # gymnasium outside envs
        "newmod.py": "",                                                        # no tier
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    found = "\n".join(violations(tmp_path))
    for expected in ("device:1: upward import of pg", "private name lm._private", "lm:2: import inside a function",
                     "pg:1: upward import of baselines", "cycle:", "private name pg._helper",
                     "grpo:1: imports gymnasium", "newmod: not in TIERS"):
        assert expected in found, (expected, found)


if __name__ == "__main__":
    found = violations(Path(sys.argv[1]) if len(sys.argv) > 1 else SRC)
    print("\n".join(found) or "the layering holds")
    sys.exit(1 if found else 0)
