"""The layers of the code map (README): every import, including those inside functions, goes downwards; and every
script flag keeps its name, default and kind (the snapshot in tests/data/script_flags.json, taken before the engine/
restructuring; since then it changed only where an issue changed flags: -d and --sim_fn take several values and the
evaluation scripts gained --feature_cache, --cache_dtype and --refresh_cache; every script gained --nproc_per_node;
the training scripts --teacher_cache, --teacher_views and --teacher_cache_dtype; gld_distill.py --gld_csv and
gld_pca_learn.py --gld_ids; every script --teacher_pool, and -t/-ts check their names by a type, not a list of
choices, since they also take timm:<model name>)."""
import argparse
import ast
import importlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("gld_distill", "svd_distill", "gld_pca_learn", "svd_pca_learn", "oxford_paris_eval", "svd_eval")
NOT_FROM = {"utils": {"models", "datasets", "engine", "tools", "benchmarks"},
            "models": {"datasets", "engine", "tools", "benchmarks"},
            "datasets": {"models", "engine", "tools", "benchmarks"},
            "engine": {"tools", "benchmarks"}}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom):  # relative imports would hide the layer: not used here
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def test_imports_go_downwards_only():
    bad = []
    for package, forbidden in NOT_FROM.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for lineno, module in imported_modules(path):
                top = module.split(".")[0]
                if top in forbidden or top in SCRIPTS or module.startswith("."):
                    bad.append(f"{path.relative_to(ROOT)}:{lineno} imports {module}")
    assert not bad, "\n".join(bad)


def test_the_walker_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef f():\n    from models.teachers import build_teacher\n    import engine.cli\n")
    assert [m for _, m in imported_modules(probe)] == ["os", "models.teachers", "engine.cli"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_keeps_its_name_default_and_kind(script):
    snapshot = json.loads((ROOT / "tests" / "data" / "script_flags.json").read_text())[script]
    parser = importlib.import_module(script).get_args_parser()
    now = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        now[" ".join(action.option_strings)] = {
            "dest": action.dest, "default": action.default, "nargs": action.nargs,
            "choices": list(action.choices) if action.choices else None, "required": action.required,
            "action": type(action).__name__}
    assert sorted(now) == sorted(snapshot)
    for flag, before in snapshot.items():
        assert now[flag] == before, (flag, now[flag], before)
