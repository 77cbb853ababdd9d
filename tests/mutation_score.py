"""Score a ``mutmut run`` per module: killed / (mutants the unit tests reach), with mutants that
only change message text left out: an exception's message or a log line's arguments (a
reworded message is not a behaviour change).

Usage (after ``mutmut run``, as ``make mutate`` does): ``python -m tests.mutation_score backoff
ssrf signing receiver secretbox``. Reads mutmut's result files under ``mutants/``; exits 1
when a module is below ``--min`` percent. Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "mutants"
# mutmut's exit codes (mutmut/stats.py): killed by a failing test, or by a timeout.
KILLED = {1, 3, 36, -24, 24}
SURVIVED = {0}
NOT_REACHED = {5, 33}  # no test runs the mutated line


@dataclasses.dataclass
class Score:
    module: str
    total: int = 0
    killed: int = 0
    message_only: int = 0
    not_reached: int = 0
    survivors: list[str] = dataclasses.field(default_factory=list)

    @property
    def judged(self) -> int:
        return self.total - self.message_only - self.not_reached

    @property
    def percent(self) -> float:
        return 100.0 * self.killed / self.judged if self.judged else 100.0


def _message_strings(node: ast.AST) -> set[int]:
    """ids of string constants that form an exception's message: anything inside a ``raise``
    statement, or inside a call of a name ending in ``Error``."""
    found: set[int] = set()
    for sub in ast.walk(node):
        inside = sub if isinstance(sub, ast.Raise) or _is_error_call(sub) else None
        if inside is not None:
            found.update(
                id(c)
                for c in ast.walk(inside)
                if isinstance(c, ast.Constant) and isinstance(c.value, str)
            )
    return found


def _is_error_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return str(name).endswith(("Error", "Exception"))


_LOG_LEVELS = frozenset({"debug", "info", "warning", "error", "exception", "critical"})


def _is_log_call(node: ast.AST) -> bool:
    """``log.info(...)``, ``_log.exception(...)``: what a log line says is message text too."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
        return False
    owner = node.func.value
    return node.func.attr in _LOG_LEVELS and "log" in getattr(owner, "id", "").lower()


def _blanked(function: ast.AST) -> str:
    """The function's AST with message text emptied (and its name, which differs anyway): the
    string constants of a ``raise``, and an exception's text argument (a string, an f-string,
    or the ``None`` a mutant puts in its place)."""
    messages = _message_strings(function)
    for node in ast.walk(function):
        if id(node) in messages:
            assert isinstance(node, ast.Constant)
            node.value = ""
        if _is_log_call(node):
            assert isinstance(node, ast.Call)
            node.args, node.keywords = [], []
        if _is_error_call(node):
            assert isinstance(node, ast.Call)
            node.args = [
                ast.Constant("")
                if isinstance(arg, ast.JoinedStr)
                or (
                    isinstance(arg, ast.Constant)
                    and (arg.value is None or isinstance(arg.value, str))
                )
                else arg
                for arg in node.args
            ]
    if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
        function.name = ""
    return ast.dump(function)


def _functions(path: Path) -> dict[str, ast.AST]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name: node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }


def score(module: str) -> Score:
    result = Score(module)
    base = MUTANTS / "dispatcher" / module
    files = sorted(base.glob("*.py.meta")) if base.is_dir() else [base.with_suffix(".py.meta")]
    for meta_path in files:
        if not meta_path.exists():
            continue
        exit_codes = json.loads(meta_path.read_text(encoding="utf-8"))["exit_code_by_key"]
        functions = _functions(meta_path.with_suffix(""))
        for key, code in exit_codes.items():
            name = key.rsplit(".", 1)[1]
            result.total += 1
            original = functions.get(name.rsplit("__mutmut_", 1)[0] + "__mutmut_orig")
            mutant = functions.get(name)
            if (
                original is not None
                and mutant is not None
                and _blanked(original) == _blanked(mutant)
            ):
                result.message_only += 1
            elif code in KILLED:
                result.killed += 1
            elif code in NOT_REACHED:
                result.not_reached += 1
            else:
                result.survivors.append(f"{key} ({'survived' if code in SURVIVED else code})")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="+")
    parser.add_argument("--min", type=float, default=90.0, help="lowest acceptable killed %%")
    args = parser.parse_args(argv)
    failed = False
    print(f"{'module':<12} {'mutants':>8} {'messages':>9} {'unreached':>10} {'killed':>7} {'%':>7}")
    for module in args.modules:
        s = score(module)
        print(
            f"{module:<12} {s.total:>8} {s.message_only:>9} {s.not_reached:>10} "
            f"{s.killed:>7} {s.percent:>6.1f}%"
        )
        for survivor in s.survivors:
            print(f"    survived: {survivor}")
        failed |= s.total == 0 or s.percent < args.min
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
