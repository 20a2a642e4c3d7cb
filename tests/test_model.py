"""The early-exit model: no block dropped, edge/cloud composition, placement, costs, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from edgeexit.errors import UserError
from edgeexit.model import (
    BACKBONES,
    build_model,
    cost_table,
    load_backbone,
    load_checkpoint,
    new_model,
    save_checkpoint,
)
from edgeexit.model.adapters import Backbone
from edgeexit.model.early_exit import EarlyExitNet, group_stages
from edgeexit.model.heads import make_exit_head
from edgeexit.model.placement import place_branches
from edgeexit.model.profile import profile_blocks

SIZES = {"mobilenet_v2": 64, "mobilenet_v3_large": 64, "resnet18": 64, "resnet50": 64}


def _ee_from(bb: Backbone, input_size: int, n: int = 3) -> tuple[EarlyExitNet, list[int]]:
    prof = profile_blocks(bb.blocks, bb.head, input_size)
    positions = place_branches(prof.block_macs, n, head_macs=prof.head_macs)
    exits = [make_exit_head("bnpool", prof.block_shapes[b][0], 7) for b in positions]
    return EarlyExitNet(group_stages(bb.blocks, positions), exits, bb.head).eval(), positions


@pytest.mark.parametrize("name", BACKBONES.names())
def test_final_exit_equals_torchvision_model(name: str) -> None:
    torch.manual_seed(0)
    bb = load_backbone(name, num_classes=7)
    reference = bb.model.eval()
    net, positions = _ee_from(bb, SIZES[name])
    assert len(positions) == 3
    # every block of the backbone is in exactly one stage: none dropped, none duplicated
    assert sum(len(s) for s in net.stages) == len(bb.blocks)
    x = torch.randn(2, 3, SIZES[name], SIZES[name])
    with torch.no_grad():
        outputs = net(x)
        expected = reference(x)
    assert len(outputs) == 4
    assert torch.allclose(outputs[-1], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
def test_edge_then_cloud_equals_forward_for_every_k(name: str) -> None:
    torch.manual_seed(1)
    net, spec = new_model(name, num_classes=5, input_size=48, branches=3)
    net.eval()
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        full = net(x)
        for k in range(0, spec.num_branches + 1):
            edge_logits, h = net.edge_part(x, k)
            assert len(edge_logits) == k
            for a, b in zip(edge_logits, full[:k], strict=True):
                assert torch.equal(a, b)
            assert torch.allclose(net.cloud_part(h, k), full[-1], atol=1e-6)
    with pytest.raises(ValueError, match="split point"):
        net.edge_part(x, 4)


def test_mobilenet_v2_macs_match_published_figure() -> None:
    # torchvision documents MobileNetV2 (1000 classes, 224 px) as 0.30 GMACs ("GFLOPS" in its metadata)
    net, spec = new_model("mobilenet_v2", num_classes=1000, input_size=224, branches=3)
    costs = cost_table(net, 224)
    published = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["_ops"] * 1e9
    assert abs(costs.total_macs - 0.30e9) / 0.30e9 < 0.01
    assert abs(costs.total_macs - published) / published < 0.01


def test_linear_placement_is_equidistant_in_macs() -> None:
    net, spec = new_model("mobilenet_v2", num_classes=257, input_size=224, branches=3)
    costs = cost_table(net, 224)
    assert spec.branch_blocks == [3, 10, 14]
    for i in range(1, 4):
        share = sum(costs.stage_macs[:i]) / costs.total_macs
        assert abs(share - i / 4) < 0.03
    # cumulative MACs to each exit include the exit heads evaluated on the way
    assert costs.macs_to_exit(2) == sum(costs.stage_macs[:2]) + sum(costs.exit_macs[:2])
    assert costs.split_shapes == [[24, 56, 56], [64, 14, 14], [160, 7, 7]]
    assert costs.split_bytes == [4 * 24 * 56 * 56, 4 * 64 * 14 * 14, 4 * 160 * 7 * 7]
    assert costs.split_bytes_at(1, "fp16") == 2 * 24 * 56 * 56


def test_placement_rules() -> None:
    macs = [10] * 10
    assert place_branches(macs, 1) == [4]  # cumulative 50 of 100 after block 4
    assert place_branches(macs, 9) == list(range(9))  # every block but the last
    pareto = place_branches(macs, 2, "pareto")
    assert pareto == [1, 3]  # targets 0.2 and 0.36
    assert place_branches(macs, 0, explicit=[2, 5]) == [2, 5]
    with pytest.raises(UserError, match="at most 9 branches"):
        place_branches(macs, 10)
    with pytest.raises(UserError, match="strictly increasing"):
        place_branches(macs, 2, explicit=[5, 2])
    with pytest.raises(UserError, match=r"0\.\.8"):
        place_branches(macs, 1, explicit=[9])
    with pytest.raises(UserError, match="unknown placement"):
        place_branches(macs, 2, "cubic")


def test_conventional_model_has_no_branches() -> None:
    net, spec = new_model("mobilenet_v2", num_classes=4, input_size=32, kind="conventional")
    assert spec.branch_blocks == [] and net.num_branches == 0
    out = net.eval()(torch.randn(1, 3, 32, 32))
    assert len(out) == 1 and out[0].shape == (1, 4)


def test_checkpoint_round_trip_and_hash(tmp_path) -> None:
    torch.manual_seed(2)
    net, spec = new_model("mobilenet_v2", num_classes=3, input_size=32, branches=2, head="pool")
    spec = save_checkpoint(tmp_path, net.eval(), spec)
    assert len(spec.content_hash) == 16
    loaded, spec2 = load_checkpoint(tmp_path)
    assert spec2 == spec
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(net(x), loaded(x), strict=True):
            assert torch.equal(a, b)
    # calibration changes what the model answers, so it changes the hash
    spec.temperatures = [1.5, 1.2, 1.1]
    assert save_checkpoint(tmp_path, net, spec).content_hash != spec2.content_hash


def test_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    net, spec = new_model("mobilenet_v2", num_classes=3, input_size=32, branches=2)
    save_checkpoint(tmp_path, net, spec)
    weights = tmp_path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt or was modified"):
        load_checkpoint(tmp_path)
    # weights that do not match the spec: spec says 4 classes, weights hold 3
    save_checkpoint(tmp_path, net, spec)
    raw = json.loads((tmp_path / "spec.json").read_text())
    raw.update(num_classes=4, class_names=list("abcd"), content_hash="")
    (tmp_path / "spec.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="do not match"):
        load_checkpoint(tmp_path)
    (tmp_path / "spec.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(tmp_path)
    assert isinstance(build_model(spec), EarlyExitNet)


def test_local_weights_file_replaces_classifier(tmp_path) -> None:
    torch.manual_seed(3)
    reference = torchvision.models.resnet18()  # 1000 classes, as an ImageNet file would be
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    bb = load_backbone("resnet18", num_classes=5, weights=str(path))
    assert bb.model.fc.out_features == 5
    assert torch.equal(bb.model.conv1.weight, reference.conv1.weight)
    assert torch.equal(bb.model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    with pytest.raises(UserError, match="does not exist"):
        load_backbone("resnet18", num_classes=5, weights=str(tmp_path / "missing.pth"))
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")
    with pytest.raises(UserError, match="do not fit resnet18"):
        load_backbone("resnet18", num_classes=5, weights=str(tmp_path / "r50.pth"))


def test_bad_model_inputs() -> None:
    with pytest.raises(UserError, match="unknown backbone 'vgg99'; known: mobilenet_v2"):
        new_model("vgg99", num_classes=3, input_size=32)
    with pytest.raises(UserError, match="unknown exit head"):
        new_model("mobilenet_v2", num_classes=3, input_size=32, head="mlp")
    with pytest.raises(UserError, match="positive"):
        new_model("mobilenet_v2", num_classes=3, input_size=0)
    with pytest.raises(UserError, match="at most 18 branches"):
        new_model("mobilenet_v2", num_classes=3, input_size=32, branches=19)
