"""edgeexit: early-exit DNNs for distorted images at the edge, with adaptive offloading to the cloud.

The Python API, in the order a model goes through it::

    net, spec = edgeexit.new_model("mobilenet_v2", num_classes=10, input_size=32, branches=3)
    net, spec = edgeexit.wrap(model, ["features.2", "features.4"], input_size=32, source="torchvision:NAME")
    edgeexit.fit(net, spec, train_loader, val_loader, epochs=5)      # your own DataLoaders
    edgeexit.calibrate_model(net, spec, val_loader)                    # per-exit temperatures
    edgeexit.evaluate_model(net, spec, test_loader)                    # accuracy, edge share, MACs per alpha, k
    edgeexit.save_run("runs/mine", net, spec)                          # RUN_DIR/ee: weights + spec + hash
    with edgeexit.start_cloud("runs/mine") as cloud:                   # the cloud server, in a thread
        runner = edgeexit.load_runner("runs/mine", strategy="ee", alpha=0.8, cloud_url=cloud.url)
        answer = runner.classify_image(png_bytes)

Names are imported on first use (PEP 562), so `import edgeexit` and the servers and CLI that import its
subpackages stay light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "EarlyExitNet": "edgeexit.model.early_exit",
    "ModelSpec": "edgeexit.model.spec",
    "new_model": "edgeexit.model.build",
    "wrap": "edgeexit.model.wrap",
    "fit": "edgeexit.train.fit",
    "calibrate_model": "edgeexit.train.fit",
    "evaluate_model": "edgeexit.evaluate.loader",
    "save_run": "edgeexit.rundir",
    "load_run": "edgeexit.rundir",
    "load_runner": "edgeexit.serving.edge_runner",
    "EdgeAnswer": "edgeexit.serving.edge_runner",
    "start_cloud": "edgeexit.serving.cloud_app",
    "TrainConfig": "edgeexit.config",
    "EdgeExitError": "edgeexit.errors",
    "UserError": "edgeexit.errors",
}

__all__ = [
    "__version__",
    "EarlyExitNet",
    "ModelSpec",
    "new_model",
    "wrap",
    "fit",
    "calibrate_model",
    "evaluate_model",
    "save_run",
    "load_run",
    "load_runner",
    "EdgeAnswer",
    "start_cloud",
    "TrainConfig",
    "EdgeExitError",
    "UserError",
]

if TYPE_CHECKING:
    from edgeexit.config import TrainConfig
    from edgeexit.errors import EdgeExitError, UserError
    from edgeexit.evaluate.loader import evaluate_model
    from edgeexit.model.build import new_model
    from edgeexit.model.early_exit import EarlyExitNet
    from edgeexit.model.spec import ModelSpec
    from edgeexit.model.wrap import wrap
    from edgeexit.rundir import load_run, save_run
    from edgeexit.serving.cloud_app import start_cloud
    from edgeexit.serving.edge_runner import EdgeAnswer, load_runner
    from edgeexit.train.fit import calibrate_model, fit


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edgeexit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
