"""The runtime seam: serving reaches the networks only through `Runtime`, so a second backend plugs in by
registering a class, and calibration happens in one place whatever the backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tinyrun import tiny_images

from edgeexit.config import RunConfig
from edgeexit.errors import UserError
from edgeexit.inference import exit_probabilities
from edgeexit.model import load_checkpoint
from edgeexit.runtime import RUNTIMES, Runtime, TorchRuntime, load_runtime
from edgeexit.serving.cloud_runner import CloudRunner
from edgeexit.serving.edge_runner import ConventionalRunner, EdgeRunner, load_runner, make_runner


@RUNTIMES.register("test-delegating")
class Delegating(Runtime):
    """A second backend: it computes through a TorchRuntime that it keeps private (no `.net` to reach for)
    and records each call, so a runner that bypassed the seam would fail here."""

    name = "test-delegating"

    def __init__(self, inner: TorchRuntime) -> None:
        self._inner = inner
        self.spec, self.costs = inner.spec, inner.costs
        self.conventional_spec, self.conventional_macs = inner.conventional_spec, inner.conventional_macs
        self.calls: list[tuple] = []

    @classmethod
    def from_run(cls, run_dir: Path, *, load_conventional: bool = True) -> Delegating:
        return cls(TorchRuntime.from_run(run_dir, load_conventional=load_conventional))

    @property
    def has_conventional(self) -> bool:
        return self._inner.has_conventional

    def edge_stage(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append(("edge_stage", i))
        return self._inner.edge_stage(i, x)

    def cloud_part(self, h: torch.Tensor, k: int) -> torch.Tensor:
        self.calls.append(("cloud_part", k))
        return self._inner.cloud_part(h, k)

    def conventional(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(("conventional",))
        return self._inner.conventional(x)


def test_an_edge_runner_on_another_backend_answers_alike(tiny_run: tuple[Path, RunConfig]) -> None:
    root, cfg = tiny_run
    _, images = tiny_images(root, cfg, 8)
    torch_runner = load_runner(root, strategy="ee", alpha=0.5)
    other = load_runner(root, strategy="ee", alpha=0.5, runtime="test-delegating")
    assert isinstance(other.runtime, Delegating) and other.config()["runtime"] == "test-delegating"
    exits = set()
    for x in images:
        other.runtime.calls.clear()
        a, b = torch_runner.classify_uint8(x), other.classify_uint8(x)
        assert (a.exit, a.label, a.confidence, a.macs) == (b.exit, b.label, b.confidence, b.macs)
        # stage by stage up to the exit it answered at (k = 3 and no cloud: an offload falls back after 3)
        depth = b.exit if b.outcome == "ok" else 3
        assert other.runtime.calls == [("edge_stage", i) for i in range(1, depth + 1)]
        exits.add(b.exit)
    assert len(exits) > 1  # the comparison covers more than one exit


def test_the_cloud_on_another_backend_finishes_alike(tiny_run: tuple[Path, RunConfig]) -> None:
    root, cfg = tiny_run
    _, images = tiny_images(root, cfg, 4)
    net, spec = load_checkpoint(root / "ee")
    reference = exit_probabilities(net, spec, images, batch_size=4)[-1]  # the offline path's final exit
    cloud = CloudRunner(Delegating.from_run(root))
    for k in (1, 2, 3):
        h = spec.preprocessing.normalize(images)
        for i in range(1, k + 1):  # the edge's half, through the same seam
            h, _ = cloud.runtime.edge_stage(i, h)
        labels, confs = cloud.finish(h, k)
        assert labels == reference.argmax(1).tolist()
        torch.testing.assert_close(torch.tensor(confs), reference.max(1).values, rtol=0, atol=1e-5)
    label, conf = cloud.classify(images[0])
    assert ("conventional",) in cloud.runtime.calls and 0 <= label < spec.num_classes and 0 < conf <= 1


def test_the_runner_applies_each_exits_temperature_once(tiny_run: tuple[Path, RunConfig]) -> None:
    # The runtime returns raw logits; the answer's confidence is softmax(logits / T_i) of the exit it stopped at.
    root, cfg = tiny_run
    _, images = tiny_images(root, cfg, 8)
    runner = load_runner(root, strategy="ee", alpha=0.0, runtime="test-delegating")  # stops at exit 1
    temperature = runner.spec.temperature(1)
    assert temperature is not None and temperature != 1.0  # the check would pass vacuously at T = 1
    for x in images:
        answer = runner.classify_uint8(x)
        _, logits = runner.runtime.edge_stage(1, runner.spec.preprocessing.normalize(x).unsqueeze(0))
        want = torch.softmax(logits / temperature, dim=-1).max()
        assert answer.exit == 1 and answer.confidence == pytest.approx(float(want), abs=1e-6)
        assert answer.confidence != pytest.approx(float(torch.softmax(logits, dim=-1).max()), abs=1e-3)


def test_runners_by_role(tiny_run: tuple[Path, RunConfig]) -> None:
    root, _ = tiny_run
    rt = load_runtime(root, "torch", load_conventional=False)
    assert isinstance(make_runner(rt, strategy="entropy", alpha=0.5), EdgeRunner)
    conv = make_runner(rt, strategy="conventional", alpha=float("nan"))
    assert isinstance(conv, ConventionalRunner) and conv.config()["alpha"] is None
    assert conv.conventional_macs == rt.costs.total_macs  # the same backbone without branches
    with pytest.raises(UserError, match="unknown runtime 'tensorrt'; known: onnx, test-delegating, torch"):
        load_runtime(root, "tensorrt")
