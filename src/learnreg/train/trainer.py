"""One trainer for every registration method: single process or DDP through ``torchrun``.

The trainer only uses the method interface (``forward``, ``loss``, ``predict``, a
``MethodOutput`` with a voxel displacement); it never looks at a method's name.

Reproducibility: the data order and the augmentation of step ``s`` are pure functions of
``(seed, s, rank)`` (a per-epoch permutation of the pairs, sharded across ranks like
``DistributedSampler``; a generator seeded per step), and checkpoints hold the model,
optimizer, AMP scaler and global RNG states. A run resumed from a checkpoint therefore ends
with the same weights as one that never stopped.

Outputs (rank 0 only) in the output folder::

    config.yaml         resolved configuration
    log.csv             step, time, learning rate, loss terms, validation Dice

``config.init`` starts a fresh run from another run's or a shipped model's weights
(fine-tuning); ``config.optimizer.schedule`` sets the learning rate of every step.
    checkpoints/step_0000100.pt, last.pt, best.pt (highest validation Dice)
    tensorboard/        only if TensorBoard is installed
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from learnreg.core.errors import InputError
from learnreg.data.augment import Augmenter
from learnreg.data.datasets import (
    PairDataset,
    atlas_pairs,
    collate_pairs,
    folder_subjects,
    pairs_from_csv,
    subject_pairs,
)
from learnreg.data.preprocess import NetworkGrid, Preprocessor
from learnreg.eval.metrics import mean_dice
from learnreg.spatial.sampling import warp
from learnreg.train.checkpoint import load_checkpoint, restore_rng_state, save_checkpoint
from learnreg.train.config import TrainConfig

__all__ = ["Trainer", "build_datasets", "resolve_device", "distributed_env"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- helpers
def distributed_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (``(0, 1, 0)`` alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: CUDA (this process's local GPU) if available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def build_datasets(
    config: TrainConfig, preload: bool = True
) -> tuple[PairDataset, PairDataset | None]:
    """Training and validation :class:`PairDataset` of ``config.data`` on one network grid."""
    data = config.data
    pre = Preprocessor(
        NetworkGrid(
            tuple(data.shape) if data.shape else None,
            tuple(data.spacing) if data.spacing else None,
            data.orientation,
            data.levels,
        ),
        data.percentiles,
    )
    if data.train_csv is not None:
        train_pairs = pairs_from_csv(data.train_csv)
        val_pairs = pairs_from_csv(data.val_csv) if data.val_csv else []
    else:
        assert data.images is not None
        exclude = set(data.val or []) | ({data.atlas} if data.atlas else set())
        if data.train is None:
            names = [n for n in folder_subjects(data.images, data.labels) if n not in exclude]
        else:
            names = data.train
        train = list(folder_subjects(data.images, data.labels, names).values())
        val = list(folder_subjects(data.images, data.labels, data.val).values()) if data.val else []
        if data.atlas:
            atlas = next(iter(folder_subjects(data.images, data.labels, [data.atlas]).values()))
            train_pairs, val_pairs = atlas_pairs(atlas, train), atlas_pairs(atlas, val)
        else:
            if len(train) < 2:
                raise InputError("subject-to-subject training needs at least two subjects")
            train_pairs = subject_pairs(train)
            val_pairs = subject_pairs(val) if len(val) >= 2 else []
    prealign = _prealigner(data.prealign)
    train_set = PairDataset(train_pairs, pre, preload=preload, prealign=prealign)
    val_set = (
        PairDataset(val_pairs, pre, grid=train_set.grid, preload=preload, prealign=prealign)
        if val_pairs
        else None
    )
    return train_set, val_set


def _prealigner(preset: str | None):
    """``(fixed, moving) → affine`` by the classical ``preset``, or None."""
    if preset is None:
        return None
    from learnreg.optimize.classical import register

    return lambda fixed, moving: register(fixed, moving, preset).linear()


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the global state
    random.seed(seed)


# ---------------------------------------------------------------------------- trainer
class Trainer:
    """Trains ``method`` on ``train_data``; validates with mean Dice on ``val_data``.

    Args:
        config: the resolved configuration (saved with every checkpoint).
        method: a ``RegistrationMethod`` (forward/loss/predict).
        train_data: training pairs (items as :class:`PairDataset` yields them).
        val_data: validation pairs with labels (optional).
        output: output folder (default ``config.output``).
        augmenter: default: from ``config.data.augment`` when any augmentation is enabled.
        callback: called as ``callback(trainer, step, losses)`` after every optimizer step
            (on every rank); raising from it stops training without saving (as a crash).
    """

    def __init__(
        self,
        config: TrainConfig,
        method: torch.nn.Module,
        train_data: PairDataset,
        val_data: PairDataset | None = None,
        *,
        output: str | os.PathLike | None = None,
        augmenter: Augmenter | None = None,
        callback: Callable | None = None,
    ) -> None:
        self.config = config
        self.method = method
        self.method_name = getattr(method, "name", "") or config.method
        self.train_data = train_data
        self.val_data = val_data if val_data is not None and len(val_data) else None
        self.output = Path(output if output is not None else config.output)
        if augmenter is None and config.data.augment.enabled:
            augmenter = Augmenter(config.data.augment)
        self.augmenter = augmenter
        self.callback = callback
        self.rank, self.world_size, self.local_rank = distributed_env()
        self.device = resolve_device(config.device, self.local_rank)
        self.amp = bool(config.amp) and self.device.type == "cuda"
        self.step = 0
        self.best_dice = -math.inf
        self.best_step = -1
        self.identity_dice: float | None = None
        self.elapsed = 0.0
        self._perms: dict[int, torch.Tensor] = {}
        self._own_group = False

    # ------------------------------------------------------------------ setup
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _init_distributed(self) -> None:
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend)
            self._own_group = True

    def _make_optimizer(self) -> torch.optim.Optimizer:
        o = self.config.optimizer
        params = [p for p in self.method.parameters() if p.requires_grad]
        if o.name == "adam":
            return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
        if o.name == "adamw":
            return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)

    # ------------------------------------------------------------------ data order
    def _indices(self, step: int) -> list[int]:
        """This rank's dataset indices for optimizer step ``step`` (0-based)."""
        n, w, b = len(self.train_data), self.world_size, self.config.batch_size
        per_rank = math.ceil(n / w)
        out = []
        for pos in range(step * b, (step + 1) * b):
            epoch, offset = divmod(pos, per_rank)
            if epoch not in self._perms:
                g = torch.Generator().manual_seed(self.config.seed * 7919 + epoch)
                perm = torch.randperm(n, generator=g)
                pad = per_rank * w - n
                if pad:
                    perm = torch.cat([perm, perm[:pad]])
                self._perms = {epoch: perm}  # one epoch cached at a time
            out.append(int(self._perms[epoch][self.rank :: w][offset]))
        return out

    def _batch(self, step: int):
        items = [self.train_data[i] for i in self._indices(step)]
        if self.augmenter is not None:
            g = torch.Generator().manual_seed(
                (self.config.seed * 1_000_003 + step) * 1009 + self.rank
            )
            items = [self.augmenter(it, g) for it in items]
        return collate_pairs(items).to(self.device)

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean Dice of warped moving labels over the validation pairs (all ranks)."""
        if self.val_data is None:
            return {}
        if not self.val_data.has_labels:
            raise InputError("validation pairs need label maps for Dice")
        total = torch.zeros(3, dtype=torch.float64)  # dice sum, identity sum, count
        for i in range(self.rank, len(self.val_data), self.world_size):
            batch = collate_pairs([self.val_data[i]]).to(self.device)
            with torch.autocast(self.device.type, enabled=self.amp):
                out = self.method.predict(batch.fixed, batch.moving)
            disp = out.displacement.float()
            warped = warp(batch.moving_labels, disp, mode="label")
            total[0] += mean_dice(batch.fixed_labels[0, 0], warped[0, 0])
            if self.identity_dice is None:
                total[1] += mean_dice(batch.fixed_labels[0, 0], batch.moving_labels[0, 0])
            total[2] += 1
        if self.world_size > 1:
            t = total.to(self.device) if self.device.type == "cuda" else total
            dist.all_reduce(t)
            total = t.cpu()
        count = max(float(total[2]), 1.0)
        if self.identity_dice is None:
            self.identity_dice = float(total[1]) / count
        return {"val_dice": float(total[0]) / count, "identity_dice": self.identity_dice}

    # ------------------------------------------------------------------ checkpoints
    def _extra(self) -> dict:
        return {
            "best_dice": None if self.best_dice == -math.inf else float(self.best_dice),
            "best_step": int(self.best_step),
            "identity_dice": self.identity_dice,
            "elapsed": float(self.elapsed),
            "world_size": int(self.world_size),
            "grid": self.train_data.grid.to_dict(),
            "preprocess": self.train_data.preprocessor.to_dict(),
        }

    def _save(self, path: Path, optimizer, scaler) -> None:
        save_checkpoint(
            path,
            model=self.method,
            method=self.method_name,
            step=self.step,
            config=self.config.to_dict(),
            optimizer=optimizer,
            scaler=scaler,
            extra=self._extra(),
        )

    def _restore(self, optimizer, scaler) -> bool:
        path = self.output / "checkpoints" / "last.pt"
        if not path.is_file():
            return False
        state = load_checkpoint(path, expected_method=self.method_name)
        self.method.load_state_dict(state["model"])
        if state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        extra = state.get("extra") or {}
        self.step = int(state["step"])
        self.best_dice = -math.inf if extra.get("best_dice") is None else extra["best_dice"]
        self.best_step = int(extra.get("best_step", -1))
        self.identity_dice = extra.get("identity_dice")
        self.elapsed = float(extra.get("elapsed", 0.0))
        return True

    def _load_initial_weights(self, source: str) -> None:
        """Start from the weights of ``source``: a checkpoint or model folder of the same
        method and architecture, or a shipped model's name (fine-tuning)."""
        from learnreg.zoo.models import resolve_model

        _, path = resolve_model(source)
        state = load_checkpoint(path, expected_method=self.method_name)
        mine = self.method.state_dict()
        theirs = state["model"]
        wrong = sorted(
            k for k in set(mine) | set(theirs) if k not in mine or k not in theirs
        ) or sorted(k for k in mine if tuple(mine[k].shape) != tuple(theirs[k].shape))
        if wrong:
            raise InputError(
                f"{path}: init weights do not fit this {self.method_name} network (different "
                f"architecture in method_config): {', '.join(wrong[:5])}"
            )
        self.method.load_state_dict(theirs)
        log.info("initialized %s from %s (step %s)", self.method_name, path, state["step"])

    # ------------------------------------------------------------------ logging
    def _open_log(self, resumed: bool) -> None:
        self._log_path = self.output / "log.csv"
        self._log_fields: list[str] | None = None
        if resumed and self._log_path.is_file():  # drop rows past the checkpoint
            with open(self._log_path, newline="") as fh:
                rows = list(csv.DictReader(fh))
                fields = list(rows[0].keys()) if rows else None
            rows = [r for r in rows if int(r["step"]) <= self.step]
            if fields:
                self._write_rows(fields, rows, "w")
                self._log_fields = fields
        elif self._log_path.exists():
            self._log_path.unlink()

    def _write_rows(self, fields: list[str], rows: list[dict], mode: str) -> None:
        with open(self._log_path, mode, newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            if mode == "w":
                w.writeheader()
            w.writerows(rows)

    def _log(self, row: dict) -> None:
        if not self.is_main:
            return
        if self._log_fields is None:
            keys = [k for k in row if k not in ("step", "time", "lr", "val_dice", "identity_dice")]
            self._log_fields = ["step", "time", "lr", *keys, "val_dice", "identity_dice"]
            self._write_rows(self._log_fields, [row], "w")
        else:
            self._write_rows(self._log_fields, [row], "a")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, row["step"])

    def _open_tensorboard(self):
        if not self.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed
            return None
        return SummaryWriter(str(self.output / "tensorboard"))

    # ------------------------------------------------------------------ training
    def fit(self, resume: bool = False, until: int | None = None) -> dict:
        """Train to ``config.steps`` (or stop gracefully after step ``until``).

        With ``resume=True`` training continues from ``checkpoints/last.pt`` in the output
        folder when it exists (else starts fresh). Returns a summary dict.
        """
        cfg = self.config
        self._init_distributed()
        try:
            return self._fit(resume, cfg.steps if until is None else min(until, cfg.steps))
        finally:
            if self._own_group and dist.is_initialized():
                dist.destroy_process_group()
                self._own_group = False

    def _fit(self, resume: bool, end: int) -> dict:
        cfg = self.config
        self.method.to(self.device)
        optimizer = self._make_optimizer()
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        resumed = resume and self._restore(optimizer, scaler)
        if not resumed:
            _seed_all(cfg.seed)
            if cfg.init:
                self._load_initial_weights(cfg.init)
        if self.is_main:
            (self.output / "checkpoints").mkdir(parents=True, exist_ok=True)
            text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
            tmp = self.output / ".config.yaml.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.output / "config.yaml")
            self._open_log(resumed)
        self._tb = self._open_tensorboard()
        model: torch.nn.Module = self.method
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(self.method, device_ids=ids)
        sums: dict[str, float] = {}
        nsum = 0
        last_val: dict[str, float] = {}
        t0 = time.perf_counter() - self.elapsed
        progress = self._progress()
        task = progress.add_task("training", total=end, completed=self.step) if progress else None
        try:
            if progress:
                progress.start()
            while self.step < end:
                self.method.train()
                batch = self._batch(self.step)
                with torch.autocast(self.device.type, enabled=self.amp):
                    output = model(batch.fixed, batch.moving)
                    losses = self.method.loss(batch, output)
                total = losses["total"]
                if not torch.isfinite(total):
                    raise FloatingPointError(f"loss is {float(total)} at step {self.step + 1}")
                optimizer.zero_grad(set_to_none=True)
                for group in optimizer.param_groups:
                    group["lr"] = cfg.optimizer.lr_at(self.step, cfg.steps)
                scaler.scale(total).backward()
                if cfg.optimizer.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(
                        self.method.parameters(), cfg.optimizer.grad_clip
                    )
                scaler.step(optimizer)
                scaler.update()
                self.step += 1
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                nsum += 1
                if self.callback is not None:
                    self.callback(self, self.step, losses)
                val: dict[str, float] = {}
                if self.val_data is not None and self.step % cfg.val_every == 0:
                    val = last_val = self.validate()
                self.elapsed = time.perf_counter() - t0
                if val or self.step % cfg.log_every == 0 or self.step == end:
                    row = {"step": self.step, "time": round(self.elapsed, 3)}
                    row["lr"] = optimizer.param_groups[0]["lr"]
                    row.update({k: v / max(nsum, 1) for k, v in sums.items()})
                    row.update(val)
                    self._log(row)
                    sums, nsum = {}, 0
                if progress:
                    desc = f"loss {float(total.detach()):.4f}"
                    if last_val:
                        desc += f"  val Dice {last_val['val_dice']:.3f}"
                    progress.update(task, completed=self.step, description=desc)
                if self.is_main:
                    ckpt = self.output / "checkpoints"
                    if val and val["val_dice"] > self.best_dice:
                        self.best_dice, self.best_step = val["val_dice"], self.step
                        self._save(ckpt / "best.pt", optimizer, scaler)
                    if self.step % cfg.checkpoint_every == 0:
                        self._save(ckpt / f"step_{self.step:07d}.pt", optimizer, scaler)
                    if self.step % cfg.checkpoint_every == 0 or self.step == end:
                        self._save(ckpt / "last.pt", optimizer, scaler)
                elif val and val["val_dice"] > self.best_dice:
                    self.best_dice, self.best_step = val["val_dice"], self.step
        finally:
            if progress:
                progress.stop()
            if self._tb is not None:
                self._tb.close()
        return {
            "step": self.step,
            "val_dice": last_val.get("val_dice"),
            "identity_dice": self.identity_dice,
            "best_dice": None if self.best_dice == -math.inf else self.best_dice,
            "best_step": self.best_step,
            "output": str(self.output),
        }

    def _progress(self):
        if not (self.is_main and self.config.progress):
            return None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        return Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
        )
