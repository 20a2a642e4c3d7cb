"""Backbone adapters, MAC profiling, branch placement, exit heads, EarlyExitNet, costs and checkpoints."""

from edgeexit.model.adapters import BACKBONES, Backbone, load_backbone
from edgeexit.model.build import build_model, new_model
from edgeexit.model.checkpoint import load_checkpoint, load_spec, save_checkpoint
from edgeexit.model.costs import CostTable, cost_table
from edgeexit.model.early_exit import EarlyExitNet
from edgeexit.model.heads import HEADS
from edgeexit.model.spec import ModelSpec

__all__ = [
    "BACKBONES",
    "HEADS",
    "Backbone",
    "CostTable",
    "EarlyExitNet",
    "ModelSpec",
    "build_model",
    "cost_table",
    "load_backbone",
    "load_checkpoint",
    "load_spec",
    "new_model",
    "save_checkpoint",
]
