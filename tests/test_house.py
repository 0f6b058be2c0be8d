"""The house (issue 18): a plan you can read from ``ls``, kept by tests.

(a) no import cycle between the project's modules, and the dependency direction of DESIGN.md
    (``analysis → full_model → microbench``, ``analysis → microbench``: microbench imports
    neither, full_model not analysis), every import counted — absolute, relative, and those
    inside functions;
(b) ``ls microbench/`` shows the probes at the door and the three machinery folders, nothing else;
(c) every user command of the README (and every probe, and every subcommand) answers ``--help``;
(d) no module over 450 lines, no function over 80 (STYLE.md: ~450 and ~60).
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from microbench.harness.registry import PROBES, module_of
from tests.launch import REPO, env

PACKAGES = ("microbench", "full_model", "analysis", "benchmarks")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
GENERATED = {"analysis/notebooks/make_notebooks.py"}  # notebook text written as Python, not code to read
README_COMMANDS = (  # at least these; every other `python -m` of the README is found in it
    "microbench", *(module_of(p) for p in PROBES), "analysis.predict", "analysis.project",
    "analysis.calibrate", "analysis.report", "analysis.crosscheck", "full_model.train",
    "full_model.megatron", "benchmarks.crosscheck_megatron", "benchmarks.allreduce_overhead",
    "benchmarks.megatron_host")
SUBCOMMANDS = {"analysis.crosscheck": {"compare", "local", "megatron"},
               "full_model.megatron": {"parse", "script", "install", "run"}}


def _sources() -> dict[str, Path]:
    """Module name → file, for every module of the four packages."""
    out = {}
    for top in PACKAGES:
        for path in sorted((REPO / top).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The project modules ``name`` imports, anywhere in the file. ``from pkg import sub`` is
    an import of the module ``pkg.sub`` where that is a module, else of ``pkg``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.add(sub if sub in modules else target)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    return {name: _imports(name, path, set(sources)) for name, path in sources.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# --- (a) imports ---------------------------------------------------------------------------------

def test_the_import_walk_sees_every_kind_of_import():
    g = _graph()
    assert "microbench.harness.modelargs" in g["full_model.train"]            # absolute
    assert "full_model.reference.step" in g["full_model.train"]               # inside a function
    assert "analysis.load" in g["analysis"]                                   # from a package's __init__
    assert "microbench.harness.modelargs" in g["analysis.crosscheck.megatron"]  # inside a function
    assert len(g) > 80


def test_no_import_cycle_between_modules():
    assert _cycles(_graph()) == []


def test_a_cycle_would_be_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("lower, higher", [("microbench", "full_model"), ("microbench", "analysis"),
                                           ("full_model", "analysis")])
def test_dependencies_point_one_way(lower, higher):
    wrong = sorted(f"{m} imports {t}" for m, targets in _graph().items() if m.split(".")[0] == lower
                   for t in targets if t.split(".")[0] == higher)
    assert wrong == []


# --- (b) the door --------------------------------------------------------------------------------

def test_ls_microbench_shows_the_probes_and_three_folders():
    shown = {p.name for p in (REPO / "microbench").iterdir() if p.name != "__pycache__" and not p.name.startswith(".")}
    assert shown == {f"{name}.py" for name in PROBES} | {"__init__.py", "__main__.py", "model", "runtime", "harness"}
    assert all((REPO / "microbench" / d).is_dir() for d in ("model", "runtime", "harness"))


# --- (c) every command answers --help ------------------------------------------------------------

HELP_RUNNER = r"""
import contextlib, io, json, runpy, sys, warnings
warnings.simplefilter("ignore")
out = {}
for argv in json.loads(sys.argv[1]):
    sys.argv = [argv[0], *argv[1:]]
    buf = io.StringIO()
    code = None
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:
            code = f"{type(e).__name__}: {e}"
    out[" ".join(argv)] = [code, buf.getvalue()[:3000]]
print(json.dumps(out))
"""


def readme_commands() -> set[tuple[str, ...]]:
    """``python -m X [SUB …]`` in the README's code (fenced blocks and inline spans) for the
    project's packages, with every subcommand named after X (``script | parse``); a span
    ``.name`` beside ``python -m pkg.mod`` on a line (the probe table) is ``pkg.name``."""
    text = (REPO / "README.md").read_text()
    spans = re.findall(r"```.*?```", text, re.S)
    spans += [" ".join(re.findall(r"`([^`\n]+)`", line)) for line in re.sub(r"```.*?```", "", text, flags=re.S).splitlines()]
    found = set()
    for span in spans:
        for mod, rest in re.findall(r"(?:python3?|torchrun[^\n]*?)\s+-m\s+([\w.]+)([^\n]*)", span):
            if mod.split(".")[0] not in PACKAGES:
                continue
            subs = [w for w in re.findall(r"[a-z]+", re.split(r"[-\[<$`]", rest, maxsplit=1)[0])
                    if w in SUBCOMMANDS.get(mod, ())]
            found |= {(mod, sub) for sub in subs} or {(mod,)}
            found |= {(f"{mod.rpartition('.')[0]}.{name}",) for name in re.findall(r"(?:^|\s)\.(\w+)\b", rest)}
    return found


def _help(argvs: list[list[str]]) -> dict[str, list]:
    res = subprocess.run([sys.executable, "-c", HELP_RUNNER, json.dumps(argvs)], cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_the_readme_names_its_commands():
    """The README's commands, as the parser reads them: every one of README_COMMANDS, and the
    subcommands of its examples and of its table."""
    found = readme_commands()
    assert {c[0] for c in found} >= set(README_COMMANDS)
    assert {c for c in found if len(c) == 2} >= {("analysis.crosscheck", "compare"), ("analysis.crosscheck", "local"),
                                                 ("analysis.crosscheck", "megatron"), ("full_model.megatron", "script"),
                                                 ("full_model.megatron", "parse"), ("full_model.megatron", "install"),
                                                 ("full_model.megatron", "run")}


def test_every_user_command_answers_help():
    commands = {(m,) for m in README_COMMANDS} | readme_commands()
    commands |= {(m, s) for m, subs in SUBCOMMANDS.items() for s in subs}
    argvs = sorted([*c, "--help"] for c in commands)
    got = _help(argvs)
    bad = {k: v for k, v in got.items() if v[0] != 0 or "usage:" not in v[1]}
    assert bad == {}
    # the subcommands a parser offers are the ones checked
    for mod, subs in SUBCOMMANDS.items():
        usage = got[f"{mod} --help"][1]
        offered = set(re.search(r"\{([\w,]+)\}", usage).group(1).split(","))
        assert offered == subs, (mod, offered)


# --- (d) sizes -----------------------------------------------------------------------------------

def _sizes() -> tuple[list[str], list[str]]:
    modules, functions = [], []
    for path in _sources().values():
        rel = path.relative_to(REPO).as_posix()
        if rel in GENERATED:
            continue
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            modules.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    functions.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    return modules, functions


def test_no_module_over_450_lines():
    assert _sizes()[0] == []


def test_no_function_over_80_lines():
    assert _sizes()[1] == []
