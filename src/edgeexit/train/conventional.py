"""The conventional baseline made from the EE-DNN's final exit (train.conventional = "final_exit")."""

from __future__ import annotations

import logging

from edgeexit.errors import UserError
from edgeexit.model import ModelSpec, load_checkpoint, load_spec, new_model, save_checkpoint
from edgeexit.model.checkpoint import SPEC
from edgeexit.rundir import RunDir
from edgeexit.train import distributed as ddp

__all__ = ["conventional_from_final_exit"]

log = logging.getLogger(__name__)
log.addFilter(ddp.MainRankOnly())


def conventional_from_final_exit(run: RunDir, info: ddp.DistInfo) -> ModelSpec:
    """A conventional checkpoint holding the EE-DNN's stages and final head: the EE final exit, no branches."""
    if not (run.ee / SPEC).is_file():
        raise UserError(
            f"train.conventional = 'final_exit' needs the EE-DNN checkpoint in {run.ee}; train --model ee first"
        )
    ee_net, ee = load_checkpoint(run.ee)
    net, spec = new_model(
        ee.backbone,
        num_classes=ee.num_classes,
        class_names=ee.class_names,
        input_size=ee.input_size,
        resize_size=ee.resize_size,
        mean=ee.mean,
        std=ee.std,
        head=ee.head,
        weights=None,  # overwritten below; never download ImageNet weights just to discard them
        kind="conventional",
        dataset=ee.dataset,
        data_root=ee.data_root,
        split_seed=ee.split_seed,
    )
    ee_blocks = [b for stage in ee_net.stages for b in stage]
    conv_blocks = list(net.stages[0])
    for src, dst in zip(ee_blocks, conv_blocks, strict=True):
        dst.load_state_dict(src.state_dict(), strict=True)
    net.head.load_state_dict(ee_net.head.state_dict(), strict=True)
    spec.weights_init = ee.weights_init
    spec.training = {
        **ee.training,
        "conventional": "final_exit",
        "source": str(run.ee),
        "source_hash": ee.content_hash,
    }
    test_acc = ee.metrics.get("test_accuracy")
    spec.metrics = {"source": "ee final exit", "test_accuracy": test_acc[-1:] if test_acc else None}
    if info.is_main:
        spec = save_checkpoint(run.conventional, net, spec)
        log.info("conventional DNN = EE-DNN final exit (%s) -> %s", ee.content_hash, run.conventional)
    ddp.barrier(info)
    return load_spec(run.conventional)
