"""The runtime seam: the three pieces of a deployed run that serving computes, behind one small interface.

- `edge_stage(i, x)`: stage i and its exit head -> (the features after stage i, the logits of exit i);
- `cloud_part(h, k)`: the stages after k and the final head -> the final logits;
- `conventional(x)`: the cloud-only conventional DNN -> its logits.

The edge runner and the cloud app call nothing else, so a second backend plugs in by registering a class
under `RUNTIMES` without touching policy or serving code. Inputs are normalised float tensors
(`spec.preprocessing`), outputs raw logits: temperatures are applied by `edgeexit.inference.calibrate`, the
same for every backend.

The edge runner steps through the edge with `edge_input` and `edge_probs`, which by default are the above plus
`calibrate`; a backend may override both to keep its own array type from stage to stage (runtime onnx stays in
numpy: on one batch-1 image torch's per-operation cost dominated these steps).

Two backends: PyTorch (`TorchRuntime`, "torch") and ONNX Runtime (`OnnxRuntime`, "onnx", one graph per piece,
in `edgeexit.onnx_runtime`; onnxruntime is imported only when it loads a run).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeexit.data.preprocess import Preprocessing
from edgeexit.errors import UserError
from edgeexit.inference import calibrate
from edgeexit.model.build import build_model
from edgeexit.model.checkpoint import SPEC, load_checkpoint, load_spec
from edgeexit.model.costs import CostTable, cost_table
from edgeexit.model.early_exit import EarlyExitNet
from edgeexit.model.spec import ModelSpec
from edgeexit.registry import Registry
from edgeexit.rundir import RunDir

__all__ = [
    "Runtime",
    "TorchRuntime",
    "RUNTIMES",
    "load_runtime",
    "RunSpecs",
    "run_specs",
    "check_ee_spec",
    "measure_conventional_macs",
]

log = logging.getLogger(__name__)


class Runtime(ABC):
    """A run's EE-DNN split into deployable pieces (and, when the run has one, its conventional DNN)."""

    name: str = ""
    spec: ModelSpec  # the EE-DNN
    costs: CostTable  # MACs per stage and exit head, split shapes and bytes of the EE-DNN
    conventional_spec: ModelSpec | None = None
    conventional_macs: int | None = None  # MACs of one conventional-DNN inference (None: the run has none)

    @classmethod
    @abstractmethod
    def from_run(cls, run_dir: Path, *, load_conventional: bool = True) -> Runtime:
        """The run's models; the conventional DNN's weights only when `load_conventional`."""

    @abstractmethod
    def edge_stage(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage i (1-based, 1..N) on its input, then exit head i: (features after stage i, exit-i logits)."""

    @abstractmethod
    def cloud_part(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """Stages k+1..N+1 and the final head on the features after stage k: the final logits [B, C]."""

    @abstractmethod
    def conventional(self, x: torch.Tensor) -> torch.Tensor:
        """The conventional DNN's logits [B, C] on normalised images; UserError when the run has none."""

    @property
    def has_conventional(self) -> bool:
        """Whether `conventional` can run (the run has a conventional DNN and this runtime loaded it)."""
        return False

    @cached_property
    def preprocessing(self) -> Preprocessing:
        """The EE-DNN's preprocessing, made once (`spec.preprocessing` builds a new one each time)."""
        return self.spec.preprocessing

    def edge_input(self, x: torch.Tensor) -> Any:
        """One uint8 image [3, S, S] as stage 1's input [1, 3, S, S], in the array type `edge_probs` takes."""
        return self.preprocessing.normalize(x).unsqueeze(0)

    def edge_probs(self, i: int, h: Any) -> tuple[Any, np.ndarray]:
        """The edge runner's step i: `edge_stage` on `h` (from `edge_input` or step i - 1), then `calibrate` with
        exit i's temperature: (features after stage i, calibrated probabilities [B, C] as a numpy array)."""
        h, logits = self.edge_stage(i, h)
        return h, calibrate(logits, self.spec.temperature(i)).numpy(force=True)


def measure_conventional_macs(ee_spec: ModelSpec, ee_costs: CostTable, conv_spec: ModelSpec) -> int:
    """MACs of the conventional DNN: the EE-DNN's stages + head when it is the same backbone, else measured."""
    same = (conv_spec.backbone, conv_spec.num_classes, conv_spec.input_size) == (
        ee_spec.backbone,
        ee_spec.num_classes,
        ee_spec.input_size,
    )
    if same:
        return ee_costs.total_macs
    return cost_table(build_model(conv_spec), conv_spec.input_size).total_macs  # MACs need no weights


def check_ee_spec(spec: ModelSpec, where: Path | str) -> None:
    """A UserError unless `spec` is an EE-DNN (side branches) whose temperatures, if any, match its exits."""
    if spec.kind != "early_exit" or spec.num_branches < 1:
        raise UserError(f"{where} holds a model without side branches; expected the EE-DNN")
    if spec.temperatures is not None and len(spec.temperatures) != spec.num_exits:
        raise UserError(f"model spec has {len(spec.temperatures)} temperatures for {spec.num_exits} exits")


@dataclass(frozen=True)
class RunSpecs:
    """What every backend reads from a run before its weights: the specs of its models and where they are."""

    run: RunDir
    ee: ModelSpec
    conventional: ModelSpec | None  # None: the run has no conventional DNN


def run_specs(run_dir: Path) -> RunSpecs:
    """RUN_DIR/ee/spec.json (checked to be an EE-DNN) and RUN_DIR/conventional/spec.json when present."""
    run = RunDir(Path(run_dir))
    ee = load_spec(run.ee)
    check_ee_spec(ee, run.ee)
    conv = load_spec(run.conventional) if (run.conventional / SPEC).is_file() else None
    return RunSpecs(run, ee, conv)


RUNTIMES: Registry[type[Runtime]] = Registry("runtime")


@RUNTIMES.register("torch")
class TorchRuntime(Runtime):
    """Eager PyTorch modules, run under `torch.inference_mode` on the CPU (or wherever the modules are)."""

    name = "torch"

    def __init__(
        self,
        net: EarlyExitNet,
        spec: ModelSpec,
        *,
        costs: CostTable | None = None,
        conventional_net: EarlyExitNet | None = None,
        conventional_spec: ModelSpec | None = None,
    ) -> None:
        check_ee_spec(spec, "the runtime's model spec")
        if conventional_net is not None and conventional_spec is None:
            raise ValueError("a conventional network needs its spec")
        net.eval()
        self.net = net
        self.spec = spec
        self.costs = costs if costs is not None else cost_table(net, spec.input_size)
        self.conventional_net = conventional_net.eval() if conventional_net is not None else None
        self.conventional_spec = conventional_spec
        self.conventional_macs = (
            None
            if conventional_spec is None
            else measure_conventional_macs(spec, self.costs, conventional_spec)
        )

    @classmethod
    def from_run(cls, run_dir: Path, *, load_conventional: bool = True) -> TorchRuntime:
        """RUN_DIR/ee, and RUN_DIR/conventional when present: its weights only with `load_conventional`
        (the cloud runs it; the edge needs only its spec and MACs)."""
        specs = run_specs(run_dir)
        net, spec = load_checkpoint(specs.run.ee)
        check_ee_spec(spec, specs.run.ee)
        conv_net, conv_spec = None, specs.conventional
        if conv_spec is not None and load_conventional:
            conv_net, conv_spec = load_checkpoint(specs.run.conventional)
        return cls(net, spec, conventional_net=conv_net, conventional_spec=conv_spec)

    @property
    def has_conventional(self) -> bool:
        """Whether the conventional DNN's weights are loaded."""
        return self.conventional_net is not None

    @torch.inference_mode()
    def edge_stage(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage i, then exit head i."""
        h = self.net.run_stage(i, x)
        return h, self.net.run_exit(i, h)

    @torch.inference_mode()
    def cloud_part(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """`EarlyExitNet.cloud_part`."""
        return self.net.cloud_part(h, k)

    @torch.inference_mode()
    def conventional(self, x: torch.Tensor) -> torch.Tensor:
        """The conventional network's only exit."""
        if self.conventional_net is None:
            raise UserError(
                "this runtime has no conventional DNN (RUN_DIR/conventional was absent or not loaded)"
            )
        return self.conventional_net(x)[-1]


def load_runtime(run_dir: Path, name: str = "torch", *, load_conventional: bool = True) -> Runtime:
    """The run's models in runtime `name` (see RUNTIMES); an unknown name lists the known ones."""
    return RUNTIMES.get(name).from_run(Path(run_dir), load_conventional=load_conventional)


# The ONNX Runtime backend registers itself as "onnx"; its module imports onnxruntime only when it loads a run.
from edgeexit import onnx_runtime as _onnx_runtime  # noqa: E402, F401
