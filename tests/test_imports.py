"""Import weight: the serving side, the CLI and the config must not drag in the analysis stack.

A cloud or edge server only needs torch, the model and the HTTP stack; pandas, pyarrow, scipy.stats,
matplotlib and torchmetrics belong to training, evaluation and reporting, and each costs start-up time and
resident memory in every server process. The `edgeexit` command (and its config) must stay light as well, so
that `edgeexit --help` or a server starts without importing what it does not use.

Each check runs in a fresh interpreter (this test process has long since imported everything). The child
imports the modules one at a time and records, for each heavy package, which edgeexit module was being
imported when it first came in and the chain of modules that were executing at that moment, so a failure
says what to move to a lazy import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("matplotlib", "pandas", "scipy.stats", "torchmetrics", "pyarrow")
# Loaded only when the onnx runtime loads a run or a run is exported, never by importing serving or the CLI.
ONNX = ("onnxruntime", "onnx")

# Runs in the child. argv[1]: JSON {"targets": [...], "walk": [...], "heavy": [...]}. `walk` are packages
# whose modules are discovered with pkgutil.walk_packages (so newly added modules are covered) and imported
# in that order after the package itself; `targets` are imported afterwards. Prints one JSON line.
_CHILD = r"""
import importlib, json, pkgutil, sys, traceback

req = json.loads(sys.argv[1])
heavy = tuple(req["heavy"])
chains = {}  # heavy name -> the modules executing when it was first really imported (not just looked up)
by = {}  # heavy name -> the edgeexit module whose import made it appear in sys.modules
errors = {}
imported = []


def _chain():
    names = []
    f = sys._getframe(2)
    innermost = True
    while f is not None:
        name = f.f_globals.get("__name__", "?")
        internal = name.startswith(("importlib", "_frozen_importlib")) or name == __name__
        if not internal and (innermost or f.f_code.co_name == "<module>"):
            if not names or names[-1] != name:
                names.append(name)
            innermost = False
        f = f.f_back
    return [n for n in reversed(names) if n != "__main__"]


class _Watch:
    # First in sys.meta_path: sees every module the first time it is looked for, finds nothing itself.
    # importlib.util.find_spec (torch._dynamo probes for pandas that way) looks without importing, so only
    # look-ups made by the import machinery itself (_find_and_load_unlocked) count.
    def find_spec(self, fullname, path=None, target=None):
        if fullname in heavy and fullname not in chains:
            if sys._getframe(2).f_code.co_name == "_find_and_load_unlocked":
                chains[fullname] = _chain() + [fullname]
        return None


sys.meta_path.insert(0, _Watch())


def _import(name):
    try:
        importlib.import_module(name)
        imported.append(name)
        ok = True
    except BaseException as exc:  # a module that does not import is reported, the others still checked
        errors[name] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        ok = False
    for h in heavy:
        if h in sys.modules and h not in by:
            by[h] = name
    return ok


for h in heavy:
    if h in sys.modules:  # already there at start-up (sitecustomize, a .pth file): not ours
        by[h] = None
for pkg in req["walk"]:
    if _import(pkg):
        mod = sys.modules[pkg]
        for info in pkgutil.walk_packages(mod.__path__, pkg + ".", onerror=lambda n: None):
            _import(info.name)
for name in req["targets"]:
    _import(name)
loaded = {h: {"by": by[h], "chain": chains.get(h, [])} for h in heavy if h in sys.modules}
print(json.dumps({"imported": imported, "errors": errors, "loaded": loaded}))
"""


def _probe(targets: list[str], walk: list[str], heavy: tuple[str, ...]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    request = json.dumps({"targets": targets, "walk": walk, "heavy": list(heavy)})
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, request], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, f"import probe crashed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _explain(result: dict) -> str:
    lines = []
    for heavy, seen in result["loaded"].items():
        by = seen["by"] or "(already loaded when the interpreter started)"
        chain = " -> ".join(seen["chain"]) or "(chain not recorded)"
        lines.append(f"  {heavy} was loaded by importing {by}: {chain}")
    for name, err in result["errors"].items():
        lines.append(f"  {name} failed to import: {err.splitlines()[-1]}")
    return "\n".join(lines)


def test_serving_inference_runtime_import_light() -> None:
    result = _probe(
        ["edgeexit.inference", "edgeexit.runtime", "edgeexit.onnx_runtime"],
        ["edgeexit.serving"],
        (*HEAVY, *ONNX),
    )
    found = [m for m in (*result["imported"], *result["errors"]) if m.startswith("edgeexit.serving.")]
    assert found, f"pkgutil.walk_packages found no module in edgeexit.serving: {result}"
    if result["loaded"] or result["errors"]:
        pytest.fail(
            "the serving side must import without the analysis stack "
            f"(imported: {', '.join(result['imported'])}):\n{_explain(result)}",
            pytrace=False,
        )


def test_config_and_cli_import_light() -> None:
    heavy = (*HEAVY, *ONNX, "torchvision")
    result = _probe(["edgeexit.config", "edgeexit.cli"], [], heavy)
    if result["loaded"] or result["errors"]:
        pytest.fail(
            f"`edgeexit.config` and `edgeexit.cli` must import without heavy packages:\n{_explain(result)}",
            pytrace=False,
        )


def test_package_import_is_light_and_every_public_name_resolves() -> None:
    """`import edgeexit` loads nothing heavy (not even torch): its public names are imported on first use."""
    heavy = (*HEAVY, "torch", "torchvision")
    result = _probe(["edgeexit"], [], heavy)
    if result["loaded"] or result["errors"]:
        pytest.fail(f"`import edgeexit` must stay light:\n{_explain(result)}", pytrace=False)
    code = (
        "import edgeexit\n"
        "missing = [n for n in edgeexit.__all__ if getattr(edgeexit, n, None) is None]\n"
        "assert not missing, missing\n"
        "assert set(edgeexit.__all__) - {'__version__'} == set(edgeexit._EXPORTS)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
