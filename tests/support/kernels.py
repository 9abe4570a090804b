"""One real compiled kernel for the integration tests: a tiny MLP (16 -> 32 -> 16, GELU) compiled by
the real compiler (the compile Job's entrypoint: export, two AOTInductor compiles, validation).

The `mlp_bundle` fixture (tests/integration/conftest.py) compiles it once per session (~25 s on 2
cores) and every module that needs a kernel shares it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

F, HID, MAX_BATCH = 16, 32, 64
TEMPLATE = {"name": "mlp", "params": {"features": F, "hidden": HID, "activation": "gelu"}}


def reference_module() -> nn.Module:
    """The eager module the kernel was compiled from (same graph, same init seed)."""
    from esper.blueprint import build_module, validate_source

    return build_module(validate_source({"template": TEMPLATE}), seed=0).eval()


def compile_bundle(out: Path) -> None:
    """Compile with the real compiler and take the bundle out of its store into `out`."""
    from esper.tezzeret.entrypoint import main as tezzeret

    work = out.parent
    spec = {
        "template": TEMPLATE,
        "compile": {"maxBatch": MAX_BATCH, "validateBatches": [1, 5], "benchmarkBatches": [8]},
    }
    (work / "bp.json").write_text(json.dumps(spec))
    argv = ["--blueprint", str(work / "bp.json"), "--target", "cpu", "--store", str(work / "store")]
    assert tezzeret([*argv, "--result-path", str(work / "result.json")]) == 0
    key = json.loads((work / "result.json").read_text())["key"]
    shutil.copytree(work / "store" / "kernels" / key, out)
