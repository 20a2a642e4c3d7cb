"""Joint training of every exit (sum of weighted cross-entropies), the conventional baseline, resumable state.

Layout inside RUN_DIR/<which>/:
    weights.safetensors + spec.json     the best-validation-loss weights so far (the model checkpoint)
    metrics.jsonl                       one line per completed epoch
    train_state/state.json              commit record of the last completed epoch (written last, atomically)
    train_state/weights-eNNNN.safetensors, optim-eNNNN.pt   current weights, optimizer + scheduler state

Determinism: the model is initialised from `train.seed`; every epoch reseeds the global RNGs (torch, numpy,
python) and draws its batch order and augmentation from generators seeded by (seed, epoch, rank). An epoch's
randomness therefore depends only on the seed and the weights it starts from, so a run resumed after
epoch e continues bit-identically to one that was never interrupted.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from tqdm import tqdm

from edgeexit.config import RunConfig, TrainConfig
from edgeexit.data import (
    DEFAULT_LEVELS,
    DISTORTIONS,
    ImageDataset,
    Preprocessing,
    Split,
    SplitImages,
    check_level,
    distort,
    load_uint8,
)
from edgeexit.devices import resolve_device
from edgeexit.errors import UserError
from edgeexit.model import EarlyExitNet, ModelSpec, load_checkpoint, load_spec, new_model, save_checkpoint
from edgeexit.model.checkpoint import SPEC, WEIGHTS, atomic_write_bytes
from edgeexit.rundir import RunDir, prepare_data
from edgeexit.train import distributed as ddp

__all__ = [
    "SplitData",
    "collect_logits",
    "load_split_data",
    "prepare_data",
    "resolve_device",
    "train_model",
    "DIGIT_DATASETS",
]

log = logging.getLogger(__name__)
log.addFilter(ddp.MainRankOnly())

DIGIT_DATASETS = frozenset({"mnist5k", "digits"})  # shift augmentation only: a flipped digit is another digit
STATE_FORMAT = "edgeexit-train-state"
# Config keys that may differ between an interrupted run and its resumption (they do not change the result).
_RESUME_FREE = {"train.device", "train.num_workers", "train.conventional"}


# ---- data ----------------------------------------------------------------------------------------------


@dataclass
class SplitData:
    """uint8 images of one subset: preloaded in memory (small datasets) or read through a DataLoader (large)."""

    labels: torch.Tensor  # int64 [n]
    images: torch.Tensor | None = None  # uint8 [n, 3, H, W] when in memory
    lazy: SplitImages | None = None
    num_workers: int = 0

    def __len__(self) -> int:
        return int(self.labels.numel())

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) batches in the given order of positions 0..n-1."""
        if self.images is not None:
            for s in range(0, order.numel(), batch_size):
                idx = order[s : s + batch_size]
                yield self.images[idx], self.labels[idx]
            return
        assert self.lazy is not None
        groups = [order[s : s + batch_size].tolist() for s in range(0, order.numel(), batch_size)]
        loader = torch.utils.data.DataLoader(self.lazy, batch_sampler=groups, num_workers=self.num_workers)
        yield from loader


def load_split_data(
    ds: ImageDataset, indices: np.ndarray, prep: Preprocessing, num_workers: int = 0
) -> SplitData:
    """In-memory datasets are preloaded as one uint8 tensor (fast batching); file-backed ones stay lazy."""
    labels = torch.as_tensor(ds.labels[np.asarray(indices, dtype=np.int64)], dtype=torch.int64)
    if ds.arrays is not None:
        return SplitData(labels, images=load_uint8(ds, indices, prep))
    return SplitData(labels, lazy=SplitImages(ds, indices, prep), num_workers=num_workers)


@torch.no_grad()
def collect_logits(
    net: nn.Module,
    data: SplitData,
    prep: Preprocessing,
    device: torch.device,
    batch_size: int = 256,
    order: torch.Tensor | None = None,
    desc: str = "logits",
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Logits of every exit (float32, CPU, final last) and the labels, in eval mode, for `order` (default all)."""
    net.eval()
    order = torch.arange(len(data)) if order is None else order
    chunks: list[list[torch.Tensor]] = []
    labels: list[torch.Tensor] = []
    n_batches = math.ceil(order.numel() / batch_size)
    for x, y in tqdm(data.batches(order, batch_size), total=n_batches, desc=desc, disable=None, leave=False):
        out = net(prep.normalize(x.to(device)))
        chunks.append([z.float().cpu() for z in out])
        labels.append(y)
    if not chunks:
        raise UserError("no images to compute logits on: the subset is empty")
    return [torch.cat(c) for c in zip(*chunks, strict=True)], torch.cat(labels)


# ---- augmentation --------------------------------------------------------------------------------------


def _seed_of(*parts: int) -> int:
    """A 63-bit seed derived from integers (seed, epoch, rank, stream): independent streams, no collisions."""
    return int(
        np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1)
    )


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed_of(*parts))


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad 2-4 px and crop back at a random offset per image (small translations, no flip)."""
    b, _, h, w = x.shape
    p = max(2, min(4, round(min(h, w) / 8)))
    padded = F.pad(x, (p, p, p, p))
    oy = torch.randint(0, 2 * p + 1, (b,), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * p + 1, (b,), generator=gen).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # [B, H, 1]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]  # [B, 1, W]
    out = padded.permute(0, 2, 3, 1)[torch.arange(b, device=x.device)[:, None, None], rows, cols]
    return out.permute(0, 3, 1, 2).contiguous()


def _crop_box(h: int, w: int, gen: torch.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop parameters (scale 0.35-1, aspect 3/4-4/3) drawn from `gen`; centre crop fallback."""
    area = h * w
    for _ in range(10):
        u = torch.rand(4, generator=gen, dtype=torch.float64).tolist()
        target = area * (0.35 + 0.65 * u[0])
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            return int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1)), ch, cw
    return 0, 0, h, w


def _resized_crop_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random resized crop and horizontal flip per image (natural images)."""
    from torchvision.transforms.v2 import functional as TF

    b, _, h, w = x.shape
    out = torch.empty_like(x)
    flips = (torch.rand(b, generator=gen) < 0.5).tolist()
    for i in range(b):
        top, left, ch, cw = _crop_box(h, w, gen)
        img = TF.resized_crop(x[i], top, left, ch, cw, [h, w], antialias=True)
        out[i] = img.flip(-1) if flips[i] else img
    return out


def _augment(
    x: torch.Tensor, dataset: str, cfg: TrainConfig, levels: list[float], gen: torch.Generator
) -> torch.Tensor:
    """Training-only augmentation on a uint8 batch, then (when asked) a distortion at a random level."""
    if cfg.augment:
        x = _shift(x, gen) if dataset in DIGIT_DATASETS else _resized_crop_flip(x, gen)
    if cfg.distortion:
        level = levels[int(torch.randint(len(levels), (1,), generator=gen))]
        seeds = torch.randint(0, 2**31 - 1, (x.shape[0],), generator=gen).tolist()
        x = distort(x, cfg.distortion, level, seeds)
    return x


# ---- config checks -------------------------------------------------------------------------------------


def _check_train_config(t: TrainConfig) -> list[float]:
    """Validate the [train] table; returns the distortion levels to draw from (empty without distortion)."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    need(is_int(t.epochs) and t.epochs >= 1, f"train.epochs must be an integer >= 1, got {t.epochs!r}")
    need(
        is_int(t.batch_size) and t.batch_size >= 1,
        f"train.batch_size must be an integer >= 1, got {t.batch_size!r}",
    )
    need(
        is_int(t.patience) and t.patience >= 1, f"train.patience must be an integer >= 1, got {t.patience!r}"
    )
    need(is_int(t.seed) and t.seed >= 0, f"train.seed must be an integer >= 0, got {t.seed!r}")
    need(
        is_int(t.num_workers) and t.num_workers >= 0, f"train.num_workers must be >= 0, got {t.num_workers!r}"
    )
    need(isinstance(t.lr, int | float) and t.lr > 0, f"train.lr must be a number > 0, got {t.lr!r}")
    need(isinstance(t.weight_decay, int | float) and t.weight_decay >= 0, "train.weight_decay must be >= 0")
    need(isinstance(t.momentum, int | float) and 0 <= t.momentum < 1, "train.momentum must be in [0, 1)")
    need(t.optimizer in ("adam", "sgd"), f"unknown train.optimizer {t.optimizer!r}; accepted: adam, sgd")
    need(
        t.schedule in ("cosine", "constant"),
        f"unknown train.schedule {t.schedule!r}; accepted: cosine, constant",
    )
    need(
        t.conventional in ("separate", "final_exit"),
        f"unknown train.conventional {t.conventional!r}; accepted: separate, final_exit",
    )
    resolve_device(t.device)
    if not t.distortion:
        return []
    DISTORTIONS.get(t.distortion)
    levels = list(t.distortion_levels) or list(DEFAULT_LEVELS[t.distortion])
    return [check_level(t.distortion, v) for v in levels]


def _exit_weights(t: TrainConfig, num_exits: int, which: str) -> list[float]:
    """Loss weights per exit: all 1 by default; the conventional model uses the final exit's weight."""
    if t.exit_weights is None:
        return [1.0] * num_exits
    w = [float(v) for v in t.exit_weights]
    if which == "conventional":
        return w[-1:] if w else [1.0]
    if len(w) != num_exits:
        raise UserError(
            f"train.exit_weights has {len(w)} values but the model has {num_exits} exits "
            f"({num_exits - 1} branches + the final exit); give one weight per exit"
        )
    if any(not math.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
        raise UserError(f"train.exit_weights must be finite, >= 0 and not all 0, got {t.exit_weights}")
    return w


def _fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The config entries that determine a training's result, flattened to 'section.key'."""
    out = {}
    for section in ("dataset", "model", "train"):
        for k, v in asdict(getattr(cfg, section)).items():
            if f"{section}.{k}" not in _RESUME_FREE:
                out[f"{section}.{k}"] = v
    return out


# ---- resume state --------------------------------------------------------------------------------------


@dataclass
class _State:
    """What a completed epoch commits (state.json); tensors live in the files it names."""

    epoch: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] | None = None
    finished: bool = False

    def done(self, t: TrainConfig) -> bool:
        return self.finished or self.epoch >= t.epochs or self.bad_epochs >= t.patience


def _load_state(state_dir: Path) -> tuple[_State, dict[str, Any]] | None:
    path = state_dir / "state.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != STATE_FORMAT:
            raise ValueError("not an edgeexit training state")
        fields = {k: doc[k] for k in _State.__dataclass_fields__}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise UserError(f"corrupt training state {path}: {exc}; start afresh without --resume") from None
    st = _State(**fields)
    st.best_val_loss = float(st.best_val_loss) if st.best_val_loss is not None else math.inf
    return st, doc


def _commit_state(
    state_dir: Path, st: _State, net: nn.Module, opt: torch.optim.Optimizer, sched: Any, extra: dict[str, Any]
) -> None:
    """Write this epoch's weights and optimizer files, then state.json naming them, then drop older files."""
    tag = f"e{st.epoch:04d}"
    weights_name, optim_name = f"weights-{tag}.safetensors", f"optim-{tag}.pt"
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    atomic_write_bytes(state_dir / weights_name, save_safetensors(state))
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched else None}, buf)
    atomic_write_bytes(state_dir / optim_name, buf.getvalue())
    doc = {"format": STATE_FORMAT, "version": 1, **asdict(st), **extra}
    doc.update(weights_file=weights_name, optim_file=optim_name)
    if not math.isfinite(st.best_val_loss):
        doc["best_val_loss"] = None
    atomic_write_bytes(state_dir / "state.json", json.dumps(doc, indent=1).encode())
    for p in state_dir.iterdir():  # older epochs' files (and temp files of a crashed write)
        if p.name not in ("state.json", weights_name, optim_name) and p.is_file():
            p.unlink(missing_ok=True)


def _restore(
    state_dir: Path, doc: dict[str, Any], net: nn.Module, opt: torch.optim.Optimizer, sched: Any
) -> None:
    """Load the current weights and optimizer/scheduler state an epoch committed."""
    wpath, opath = state_dir / str(doc.get("weights_file")), state_dir / str(doc.get("optim_file"))
    try:
        net.load_state_dict(load_safetensors(wpath.read_bytes()), strict=True)
        blob = torch.load(opath, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
        opt.load_state_dict(blob["optimizer"])
        if sched is not None:
            sched.load_state_dict(blob["scheduler"])
    except (OSError, SafetensorError, RuntimeError, KeyError, TypeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot resume from {state_dir}: {first}; start afresh without --resume") from None


# ---- training ------------------------------------------------------------------------------------------


def _seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _make_optimizer(params: Any, t: TrainConfig) -> torch.optim.Optimizer:
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


def _weighted_ce(
    logits: list[torch.Tensor], y: torch.Tensor, w: list[float], reduction: str = "mean"
) -> torch.Tensor:
    total = None
    for wi, z in zip(w, logits, strict=True):
        term = wi * F.cross_entropy(z, y, reduction=reduction)
        total = term if total is None else total + term
    assert total is not None
    return total


@torch.no_grad()
def _evaluate(
    net: nn.Module,
    data: SplitData,
    prep: Preprocessing,
    device: torch.device,
    w: list[float],
    info: ddp.DistInfo,
) -> tuple[float, list[float]]:
    """Weighted validation loss (mean per sample) and every exit's accuracy, summed over ranks."""
    order = ddp.shard(torch.arange(len(data)), info, pad=False)
    sums = torch.zeros(2 + len(w), dtype=torch.float64)  # loss sum, count, correct per exit
    if order.numel():
        logits, y = collect_logits(net, data, prep, device, order=order, desc="validate")
        sums[0] = _weighted_ce(logits, y, w, reduction="sum").double()
        sums[1] = y.numel()
        sums[2:] = torch.tensor([(z.argmax(1) == y).sum().item() for z in logits], dtype=torch.float64)
    sums = ddp.all_reduce_sum(sums.to(device), info).cpu()
    n = max(float(sums[1]), 1.0)
    return float(sums[0]) / n, [float(c) / n for c in sums[2:]]


def _spec_extra(ds: ImageDataset, split: Split, cfg: RunConfig) -> dict[str, Any]:
    return {"dataset": ds.name, "data_root": cfg.dataset.root, "split_seed": split.seed}


def _build(
    cfg: RunConfig, which: str, ds: ImageDataset, split: Split, prep: Preprocessing
) -> tuple[EarlyExitNet, ModelSpec]:
    m = cfg.model
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and every run
    return new_model(
        m.backbone,
        num_classes=len(ds.class_names),
        class_names=ds.class_names,
        input_size=prep.input_size,
        resize_size=prep.resize_size,
        mean=prep.mean,
        std=prep.std,
        branches=m.branches,
        placement=m.placement,
        branch_blocks=m.branch_blocks,
        head=m.head,
        weights=m.weights,
        kind="conventional" if which == "conventional" else "early_exit",
        **_spec_extra(ds, split, cfg),
    )


def _conventional_from_final_exit(run: RunDir, cfg: RunConfig, info: ddp.DistInfo) -> ModelSpec:
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


def train_model(
    run_dir: Path,
    cfg: RunConfig,
    which: str = "ee",
    resume: bool = False,
    *,
    epoch_callback: Callable[[int], None] | None = None,
) -> ModelSpec:
    """Train the EE-DNN (`ee`) or the conventional DNN into RUN_DIR/<which>; returns the final checkpoint's spec.

    `resume=True` continues from the last completed epoch (fresh start, logged, when there is none).
    `epoch_callback(epoch)` runs on every rank after each epoch's state is committed (a hook for tests and
    progress reporting). Launched by torchrun, trains with DistributedDataParallel.
    """
    run = RunDir(Path(run_dir))
    run.model_dir(which)  # validates `which`
    levels = _check_train_config(cfg.train)
    device = resolve_device(cfg.train.device)
    info = ddp.setup(device.type)
    ok = False
    try:
        if info.enabled and device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
        if info.is_main:
            _record_config(run, cfg)
        if which == "conventional" and cfg.train.conventional == "final_exit":
            spec = _conventional_from_final_exit(run, cfg, info)
        else:
            spec = _train(run, cfg, which, resume, levels, device, info, epoch_callback)
        ok = True
        return spec
    finally:
        ddp.teardown(info, ok)


def _record_config(run: RunDir, cfg: RunConfig) -> None:
    if not run.config.is_file():
        run.save_config(cfg)
        return
    try:
        old = _fingerprint(run.load_config())
    except UserError:
        return
    diff = sorted(k for k, v in _fingerprint(cfg).items() if old.get(k) != v)
    if diff:
        log.warning("%s was recorded with other values for %s; keeping it", run.config, ", ".join(diff))


def _train(
    run: RunDir,
    cfg: RunConfig,
    which: str,
    resume: bool,
    levels: list[float],
    device: torch.device,
    info: ddp.DistInfo,
    epoch_callback: Callable[[int], None] | None,
) -> ModelSpec:
    t = cfg.train
    out_dir = run.model_dir(which)
    state_dir = out_dir / "train_state"
    ds, split, prep = prepare_data(cfg, run, save=info.is_main)
    num_classes = len(ds.class_names)

    loaded = _load_state(state_dir) if resume else None
    if resume and loaded is None:
        log.info("nothing to resume in %s: starting fresh", out_dir)
    if loaded is not None:
        _check_resumable(loaded[1], cfg, num_classes, state_dir)
    elif info.is_main:
        # a fresh start: a crash before its first epoch must not leave an older run's state to resume
        (state_dir / "state.json").unlink(missing_ok=True)

    net, spec = _build(cfg, which, ds, split, prep)
    weights = _exit_weights(t, net.num_branches + 1, which)
    spec.training = {**asdict(t), "exit_weights_used": weights, "world_size": info.world_size}
    net.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # autotuning picks kernels nondeterministically
    opt = _make_optimizer(net.parameters(), t)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs) if t.schedule == "cosine" else None
    )

    st = _State(history=[])
    best_state: dict[str, torch.Tensor] | None = None
    if loaded is not None:
        st, doc = loaded
        st.history = list(st.history or [])
        _restore(state_dir, doc, net, opt, sched)
        if st.best_epoch and (out_dir / WEIGHTS).is_file():
            best_state = load_safetensors((out_dir / WEIGHTS).read_bytes())
        elif st.best_epoch:
            log.warning("best checkpoint %s is missing: the final model will hold the last weights", out_dir)
        log.info("resuming %s after epoch %d (best epoch %d)", which, st.epoch, st.best_epoch)
        if st.finished:
            log.info("%s training already complete in %s", which, out_dir)
            return load_spec(out_dir)

    train_data = load_split_data(ds, split.train, prep, t.num_workers)
    val_data = load_split_data(ds, split.val, prep, t.num_workers)
    model = ddp.wrap(net, info, device)
    per_rank_batch = max(1, t.batch_size // info.world_size)  # keep the global batch size of the config
    fingerprint = {"config": _fingerprint(cfg), "num_classes": num_classes, "which": which}

    while not st.done(t):
        epoch = st.epoch + 1
        started = time.perf_counter()
        _seed_globals(_seed_of(t.seed, epoch, info.rank, 0))
        order = ddp.shard(torch.randperm(len(train_data), generator=_generator(t.seed, epoch, 0, 1)), info)
        gen = _generator(t.seed, epoch, info.rank, 2)
        lr = opt.param_groups[0]["lr"]
        model.train()
        loss_sum = torch.zeros(2, dtype=torch.float64)
        n_batches = math.ceil(order.numel() / per_rank_batch)
        bar = tqdm(
            train_data.batches(order, per_rank_batch),
            total=n_batches,
            desc=f"{which} epoch {epoch}/{t.epochs}",
            disable=None if info.is_main else True,
            leave=False,
        )
        for x, y in bar:
            x = _augment(x.to(device), ds.name, t, levels, gen)
            y = y.to(device)
            loss = _weighted_ce(model(prep.normalize(x)), y, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += torch.tensor([loss.item() * y.numel(), y.numel()], dtype=torch.float64)
            bar.set_postfix(loss=f"{loss_sum[0].item() / loss_sum[1].item():.4f}", refresh=False)
        bar.close()
        if sched is not None:
            sched.step()
        loss_sum = ddp.all_reduce_sum(loss_sum.to(device), info).cpu()
        train_loss = float(loss_sum[0] / loss_sum[1])
        val_loss, val_acc = _evaluate(net, val_data, prep, device, weights, info)
        seconds = time.perf_counter() - started

        improved = math.isfinite(val_loss) and val_loss < st.best_val_loss
        st.epoch = epoch
        st.train_seconds += seconds
        st.history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "lr": lr,
                "seconds": seconds,
            }
        )
        if improved:
            st.best_val_loss, st.best_epoch, st.bad_epochs = val_loss, epoch, 0
            best_state = {k: v.detach().clone().cpu() for k, v in net.state_dict().items()}
        else:
            st.bad_epochs += 1
        log.info(
            "%s epoch %d/%d: train loss %.4f, val loss %.4f%s, val acc per exit %s",
            which, epoch, t.epochs, train_loss, val_loss, " (best)" if improved else "",
            " ".join(f"{a:.4f}" for a in val_acc),
        )  # fmt: skip
        if info.is_main:
            if improved:
                spec.metrics = _progress_metrics(st)
                save_checkpoint(out_dir, net, spec)
            lines = "".join(json.dumps(h) + "\n" for h in st.history)
            atomic_write_bytes(out_dir / "metrics.jsonl", lines.encode())
            _commit_state(state_dir, st, net, opt, sched, fingerprint)
        ddp.barrier(info)
        if epoch_callback is not None:
            epoch_callback(epoch)

    if st.bad_epochs >= t.patience and st.epoch < t.epochs:
        log.info(
            "early stopping after epoch %d: no better validation loss for %d epochs", st.epoch, t.patience
        )
    job = _Job(run, cfg, which, ds, split, prep, weights, device, info)
    return _finish(job, net, spec, st, best_state, opt, sched, fingerprint)


def _check_resumable(doc: dict[str, Any], cfg: RunConfig, num_classes: int, state_dir: Path) -> None:
    if doc.get("num_classes") != num_classes:
        raise UserError(
            f"cannot resume {state_dir}: the checkpoint has {doc.get('num_classes')} classes but dataset "
            f"{cfg.dataset.name!r} has {num_classes}"
        )
    old = doc.get("config") or {}
    new = _fingerprint(cfg)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise UserError(
            f"cannot resume {state_dir}: the config differs from the interrupted run's in {', '.join(diff)}; "
            "resume with the same config, or train afresh without --resume"
        )


def _progress_metrics(st: _State) -> dict[str, Any]:
    return {"best_epoch": st.best_epoch, "best_val_loss": st.best_val_loss, "epochs_run": st.epoch}


@dataclass
class _Job:
    """What one training works on (passed to the final step)."""

    run: RunDir
    cfg: RunConfig
    which: str
    ds: ImageDataset
    split: Split
    prep: Preprocessing
    weights: list[float]
    device: torch.device
    info: ddp.DistInfo


def _finish(
    job: _Job,
    net: EarlyExitNet,
    spec: ModelSpec,
    st: _State,
    best_state: dict[str, torch.Tensor] | None,
    opt: torch.optim.Optimizer,
    sched: Any,
    fingerprint: dict[str, Any],
) -> ModelSpec:
    """Load the best weights, measure test accuracy per exit, write the final checkpoint and mark the state done."""
    out_dir = job.run.model_dir(job.which)
    current = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if best_state is not None:
        net.load_state_dict(best_state, strict=True)
    else:
        log.warning("no epoch reached a finite validation loss: keeping the last weights")
    test_data = load_split_data(job.ds, job.split.test, job.prep, job.cfg.train.num_workers)
    _, test_acc = _evaluate(net, test_data, job.prep, job.device, job.weights, job.info)
    spec.metrics = {
        **_progress_metrics(st),
        "test_accuracy": test_acc,
        "stopped_early": st.epoch < job.cfg.train.epochs,
        "train_seconds": round(st.train_seconds, 3),
    }
    log.info("%s test accuracy per exit: %s", job.which, " ".join(f"{a:.4f}" for a in test_acc))
    if job.info.is_main:
        save_checkpoint(out_dir, net, spec)
        st.finished = True
        net.load_state_dict(current, strict=True)  # the resume state keeps the last epoch's weights
        _commit_state(out_dir / "train_state", st, net, opt, sched, fingerprint)
    ddp.barrier(job.info)
    return load_spec(out_dir)
