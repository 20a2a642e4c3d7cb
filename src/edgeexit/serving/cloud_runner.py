"""The cloud's work, without HTTP: finish offloaded EE-DNN inferences and classify whole images with the
conventional DNN, through a runtime (PyTorch or another backend), calibrated by `inference.calibrate`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from edgeexit.inference import calibrate
from edgeexit.model.spec import ModelSpec
from edgeexit.runtime import Runtime, load_runtime
from edgeexit.serving import wire
from edgeexit.serving.images import IMAGE_TYPES
from edgeexit.serving.server import release_freed_memory

__all__ = ["CloudRunner"]

log = logging.getLogger(__name__)


class CloudRunner:
    """The models a cloud server holds: the EE-DNN (required) and the conventional DNN (optional)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.ee_spec: ModelSpec = runtime.spec
        self.conv_spec: ModelSpec | None = runtime.conventional_spec if runtime.has_conventional else None
        self.costs = runtime.costs

    @classmethod
    def load(cls, run_dir: Path, runtime: str = "torch") -> CloudRunner:
        """RUN_DIR/ee and, when present, RUN_DIR/conventional, in runtime `runtime`."""
        rt = load_runtime(Path(run_dir), runtime, load_conventional=True)
        if not rt.spec.calibrated:
            log.warning("EE-DNN in %s has no temperatures: answering with plain softmax", run_dir)
        if not rt.has_conventional:
            log.info("no conventional DNN in %s: /v1/classify answers 503", run_dir)
        release_freed_memory()
        return cls(rt)

    @property
    def ee_hash(self) -> str:
        """Content hash of the EE-DNN, which every offload must carry."""
        return self.ee_spec.content_hash

    @property
    def has_conventional(self) -> bool:
        """Whether /v1/classify can answer."""
        return self.conv_spec is not None

    def split_shape(self, k: int) -> list[int]:
        """Per-sample shape of the tensor after stage k."""
        return self.costs.split_shapes[k - 1]

    def finish(self, h: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
        """Stages k+1.. and the final head on a batch; calibrated labels and confidences."""
        with torch.inference_mode():
            logits = self.runtime.cloud_part(h, k)
            conf, label = calibrate(logits, self.ee_spec.temperature(self.ee_spec.num_exits)).max(dim=1)
        return label.tolist(), conf.to(torch.float32).tolist()

    def finish_many(self, k: int, tensors: list[torch.Tensor]) -> list[tuple[list[int], list[float]]]:
        """`finish` on several requests' tensors (each [B_i, *split_shape(k)]) as one forward; per request."""
        labels, confs = self.finish(tensors[0] if len(tensors) == 1 else torch.cat(tensors), k)
        out, start = [], 0
        for t in tensors:
            end = start + t.shape[0]
            out.append((labels[start:end], confs[start:end]))
            start = end
        return out

    def classify(self, x_uint8: torch.Tensor) -> tuple[int, float]:
        """The conventional DNN on one uint8 [3, H, W] image at its input size."""
        return self.classify_many([x_uint8])[0]

    def classify_many(self, images: list[torch.Tensor]) -> list[tuple[int, float]]:
        """The conventional DNN on uint8 [3, H, W] images at its input size, as one forward; per image."""
        assert self.conv_spec is not None
        with torch.inference_mode():
            x = self.conv_spec.preprocessing.normalize(torch.stack(images))
            logits = self.runtime.conventional(x)
            conf, label = calibrate(logits, self.conv_spec.temperature(self.conv_spec.num_exits)).max(dim=1)
        return list(zip(label.tolist(), conf.to(torch.float32).tolist(), strict=True))

    def info(self, max_batch: int, max_body_bytes: int) -> dict[str, Any]:
        """What /v1/model answers."""
        n = self.ee_spec.num_branches
        return {
            "ee": {"spec": self.ee_spec.to_dict(), "model_hash": self.ee_hash},
            "conventional": None
            if self.conv_spec is None
            else {"spec": self.conv_spec.to_dict(), "model_hash": self.conv_spec.content_hash},
            "runtime": self.runtime.name,
            "accepted_k": list(range(1, n + 1)),
            "split_shapes": {str(k): self.split_shape(k) for k in range(1, n + 1)},
            "precisions": list(wire.PRECISIONS),
            "max_batch": max_batch,
            "max_body_bytes": max_body_bytes,
            "classify_content_types": list(IMAGE_TYPES),
        }
