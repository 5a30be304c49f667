"""The plug-in boundary: built-in stages (and an outside plug-in) use only the public API.

``stages/`` is what a plug-in author copies, so nothing in it may reach into a
private ``pipeline._*`` or ``bpf._*`` module: if a built-in needs something, the
public API is missing it. Checked on the source (every import form, also inside
functions) and on the imported modules' globals (anything re-bound from a private
module). The README's plug-in that wraps another stage with the breaker runs here.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path
from types import ModuleType

import bpfpipe_testplugin
import numpy as np
import pytest

import pipeline
import stages
from pipeline import Outcome, load_config
from pipeline._build import build_specs
from pipeline.testing import make_batch, run_stages

ROOT = Path(__file__).resolve().parents[2]


def _is_private(module: str) -> bool:
    parts = module.split(".")
    return parts[0] in {"pipeline", "bpf"} and any(p.startswith("_") and p != "__init__" for p in parts[1:])


def private_imports(source: str) -> list[str]:
    """Every ``pipeline._x``/``bpf._x`` a module's source imports, however it is written."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if _is_private(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if _is_private(node.module):
                found.append(node.module)
            elif node.module in {"pipeline", "bpf"}:
                found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in {
            "import_module",
            "__import__",
        }:
            args = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            found += [a for a in args if _is_private(a)]
    return found


def modules_of(package: ModuleType) -> list[ModuleType]:
    names = [package.__name__] + [
        f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)
    ]
    return [importlib.import_module(name) for name in names]


PLUGIN_PACKAGES = [stages, bpfpipe_testplugin]


@pytest.mark.parametrize(
    "module", [m for p in PLUGIN_PACKAGES for m in modules_of(p)], ids=lambda m: m.__name__
)
def test_uses_only_the_public_api(module: ModuleType) -> None:
    assert module.__file__ is not None
    assert private_imports(Path(module.__file__).read_text()) == []
    leaked = [
        f"{name} from {value.__module__}"
        for name, value in vars(module).items()
        if isinstance(value, type)
        and _is_private(value.__module__)
        and value.__module__ != module.__name__
        # re-exported by the public package under the same name: that *is* public
        and getattr(importlib.import_module(value.__module__.split(".")[0]), name, None) is not value
    ]
    assert leaked == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from pipeline._channel import Edge", ["pipeline._channel"]),
        ("import pipeline._graph as g", ["pipeline._graph"]),
        ("from pipeline import _registry", ["pipeline._registry"]),
        ("from bpf._x import y", ["bpf._x"]),
        (
            "def f():\n    import importlib\n    importlib.import_module('pipeline._stage')",
            ["pipeline._stage"],
        ),
        ("from pipeline import Batch\nfrom pipeline.sampling import SamplingPolicy", []),
        ("from bpf.loader import load_program", []),
    ],
)
def test_the_check_can_fail(source: str, expected: list[str]) -> None:
    assert private_imports(source) == expected


def test_the_public_namespace_is_all_listed_and_lazy_exports_agree_with_the_typed_ones() -> None:
    assert sorted(pipeline.__all__) == sorted(pipeline._EXPORTS)
    tree = ast.parse(Path(pipeline.__file__ or "").read_text())
    typed = {
        alias.asname or alias.name: (node.module, alias.name)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert typed == pipeline._EXPORTS
    for name in pipeline.__all__:
        module, attr = pipeline._EXPORTS[name]
        assert getattr(pipeline, name) is getattr(importlib.import_module(f"pipeline.{module}"), attr)
    with pytest.raises(AttributeError):
        _ = pipeline.NoSuchName  # type: ignore[attr-defined]


def test_importing_the_package_imports_nothing_heavy() -> None:
    import subprocess
    import sys

    code = "import sys, pipeline; print(sorted(m for m in ('trio', 'numpy', 'msgspec') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- the README's plug-in, which wraps other stages ---------------------------------------------


async def test_a_plugin_stage_guarded_by_the_breaker_spools_what_fails(tmp_path: Path) -> None:
    from bpfpipe_testplugin.guarded import Enrich, EnrichConfig

    from stages.breaker import CircuitBreakerConfig, CircuitBreakerStage

    guarded = CircuitBreakerStage.around(
        Enrich, EnrichConfig(fail_on_value=3), fallback_config={"path": str(tmp_path / "spool.jsonl")}
    )
    batches = [make_batch(value=[i, i + 10]) for i in range(6)]
    result = await run_stages([(guarded, CircuitBreakerConfig())], batches)
    assert sorted(result.events["value"].tolist()) == sorted(
        2 * v for i in range(6) if i != 3 for v in (i, i + 10)
    )
    assert result.ledger.total(Outcome.FALLBACK) == 2
    assert result.ledger.pending == 0
    assert len((tmp_path / "spool.jsonl").read_text().splitlines()) == 2


async def test_a_plugin_wrapping_a_child_builds_it_like_the_runtime(tmp_path: Path) -> None:
    config_file = tmp_path / "plugin.toml"
    config_file.write_text(
        """
[source]
use = "synthetic"
[[stages]]
use = "retry_once"
config = { inner = "bpfpipe_testplugin:ScaleValue", inner_config = { factor = 3 } }
[[stages]]
use = "breaker"
config = { primary = "bpfpipe_testplugin.guarded:Enrich", fallback_config = { path = "SPOOL" } }
[sink]
use = "null"
""".replace("SPOOL", str(tmp_path / "spool.jsonl"))
    )
    specs, _ = build_specs(load_config(config_file))
    assert [s.name for s in specs] == ["synthetic", "retry_once", "breaker", "null"]

    from bpfpipe_testplugin import ScaleValue
    from bpfpipe_testplugin.guarded import RetryOnce, RetryOnceConfig

    batches = [make_batch(value=np.arange(4))]
    result = await run_stages(
        [(RetryOnce, RetryOnceConfig(inner="bpfpipe_testplugin:ScaleValue", inner_config={"factor": 3}))],
        batches,
    )
    assert result.events["value"].tolist() == [0, 3, 6, 9]
    assert result.ledger.pending == 0
    assert ScaleValue is not None


def test_a_child_config_error_names_the_key_under_the_parent(tmp_path: Path) -> None:
    config_file = tmp_path / "bad.toml"
    config_file.write_text(
        """
[source]
use = "synthetic"
[[stages]]
use = "retry_once"
name = "retry"
config = { inner = "bpfpipe_testplugin:ScaleValue", inner_config = { factr = 3 } }
[sink]
use = "null"
"""
    )
    from pipeline import StageLoadError, build_pipeline

    # The child is built with its parent, which build_pipeline (and so `bpfpipe check`) does.
    with pytest.raises(StageLoadError, match=r"config\.inner_config\.factr: unknown key .*'factor'"):
        build_pipeline(load_config(config_file))
