"""Quality gates that CI runs through pytest: ruff, no import cycle in the engine, commands in the
documentation that the command line accepts, no development history in the text."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

from conftest import ROOT

LINTED = ["SlicerSAM", "sam_core", "SlicerSAMLib", "SlicerSAM.py", "Resources", "Testing"]


def test_ruff_reports_no_problems():
    # ruff is a test dependency (pyproject [test]); a missing ruff must fail, not skip.
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", *LINTED],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", *LINTED],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _engine_imports() -> dict:
    """{module: {engine modules it imports, at module level or inside functions}}."""
    graph = {}
    for path in sorted((ROOT / "SlicerSAM").glob("*.py")):
        name = f"SlicerSAM.{path.stem}"
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "SlicerSAM":
                    imported |= {f"SlicerSAM.{a.name}" for a in node.names}
                elif node.module.startswith("SlicerSAM."):
                    imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if a.name.startswith("SlicerSAM.")}
        graph[name] = imported - {name}
    return graph


def test_the_engine_has_no_import_cycle():
    graph = _engine_imports()
    assert graph["SlicerSAM.cli"] and graph["SlicerSAM.demo"]
    done, path = set(), []

    def visit(module):
        if module in path:
            cycle = path[path.index(module) :] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done or module not in graph:
            return
        path.append(module)
        for other in sorted(graph[module]):
            visit(other)
        path.pop()
        done.add(module)

    for module in graph:
        visit(module)


def _quoted_commands():
    """Every ``python -m SlicerSAM ...`` command quoted in README.md and docs/ (continuation
    lines joined): (file, subcommand, options)."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"\\\n\s*", " ", path.read_text())
        for match in re.finditer(r"python -m SlicerSAM ([a-z-]+)([^\n`]*)", text):
            options = re.findall(r"(--[a-z][a-z-]*)", match.group(2))
            yield path.name, match.group(1), options


def test_commands_quoted_in_the_documentation_are_accepted_by_the_command_line():
    from SlicerSAM.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    quoted = list(_quoted_commands())
    assert len(quoted) > 10
    wrong = []
    for name, command, options in quoted:
        if command not in sub.choices:
            wrong.append(f"{name}: unknown command {command!r}")
            continue
        known = {o for a in sub.choices[command]._actions for o in a.option_strings}
        wrong += [f"{name}: {command} has no {o}" for o in options if o not in known]
    assert not wrong, wrong


def test_the_text_describes_the_software_not_its_development():
    """ "Session" means a user's interactive session (or pytest's scope), never a work session."""
    pattern = re.compile(
        r"\b(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|"
        r"tenth|this|last|previous|earlier|next) session\b",
        re.I,
    )
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    for folder in ("SlicerSAM", "sam_core", "SlicerSAMLib", "Testing"):
        files += [p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts]
    hits = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in files
        if p.name != "test_quality_gates.py"
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, hits
