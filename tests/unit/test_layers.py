"""The package's rooms, checked on its source: only the store speaks SQL, the engine knows no database, the
store knows no torch, and the log's table, COPY and view take their quantities from icldaemon/columns.py."""

import ast
import subprocess
import sys
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[2] / "icldaemon"
DATABASE_LIBRARIES = {"psycopg", "psycopg_pool", "sqlalchemy", "alembic"}
MODEL_LIBRARIES = {"torch", "transformers", "peft", "safetensors", "accelerate"}
SQL_CALLS = {"execute", "executemany", "exec_driver_sql", "cursor"}


def modules(under: str = "") -> list[Path]:
    return sorted((PACKAGE / under).rglob("*.py"))


def relative(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imported(path: Path) -> set[str]:
    """Every module the file imports at run time (inside functions too; not under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    names = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def top_level(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


def sql_calls(path: Path) -> list[str]:
    """`x.execute(...)`-like calls: how psycopg and SQLAlchemy are asked to run SQL."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{relative(path)}:{node.lineno} .{node.func.attr}()" for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SQL_CALLS]


def test_no_module_outside_the_store_imports_a_database_library_or_runs_sql():
    outside = [path for path in modules() if "store" not in path.relative_to(PACKAGE).parts]
    assert len(outside) > 20  # the walk sees the package
    offenders = {relative(path): sorted(top_level(imported(path)) & DATABASE_LIBRARIES) for path in outside}
    assert {name: found for name, found in offenders.items() if found} == {}
    assert [call for path in outside for call in sql_calls(path)] == []


def test_the_engine_imports_neither_the_store_nor_a_database_library():
    offenders = {relative(path): sorted(name for name in imported(path)
                                        if name.split(".")[0] in DATABASE_LIBRARIES or name.startswith("icldaemon.store"))
                 for path in modules("engine")}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_store_imports_neither_torch_nor_the_engine():
    offenders = {relative(path): sorted(name for name in imported(path)
                                        if name.split(".")[0] in MODEL_LIBRARIES or name.startswith("icldaemon.engine"))
                 for path in modules("store")}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_importing_every_store_module_loads_no_torch():
    names = [".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts) for path in modules("store")
             if "migrations" not in path.parts and path.name != "__init__.py"]
    script = "import sys\n" + "".join(f"import {name}\n" for name in names) + (
        "print(sorted(name for name in sys.modules if name.split('.')[0] in {'torch', 'transformers'}))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_quantity_added_to_the_contract_reaches_the_model_the_writer_and_the_view():
    # a fresh interpreter whose contract has one more quantity, as a contributor would add it
    script = (
        "import icldaemon.columns as columns\n"
        "columns.DYNAMICS = (*columns.DYNAMICS, columns.Quantity('curvature_norm', 'a new quantity'))\n"
        "columns.DYNAMICS_NAMES = (*columns.DYNAMICS_NAMES, 'curvature_norm')\n"
        "from icldaemon.store import models, writer\n"
        "print('curvature_norm' in models.IclDynamicsLayers.__table__.columns)\n"
        "print(writer.LAYER_COLUMNS[-1])\n"
        "print('unnest(layers.curvature_norm)::double precision AS curvature_norm' in models.ICL_DYNAMICS_LOG_VIEW)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "curvature_norm", "True"]


def test_the_model_the_writer_and_the_view_follow_the_contract():
    from icldaemon.columns import DYNAMICS_NAMES
    from icldaemon.store import models, writer

    arrays = [column.name for column in models.IclDynamicsLayers.__table__.columns
              if column.name not in ("run_id", "layer_idx", "created_at")]
    assert arrays == list(DYNAMICS_NAMES)
    assert writer.LAYER_COLUMNS == ("run_id", "layer_idx", *DYNAMICS_NAMES)
    for name in DYNAMICS_NAMES:
        assert f"unnest(layers.{name})::double precision AS {name}," in models.ICL_DYNAMICS_LOG_VIEW
