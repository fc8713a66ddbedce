"""One trainer for every registration method: single process or DDP through ``torchrun``.

The trainer only uses the method interface (``forward``, ``loss``, ``validate``,
``parameter_groups``, ``input_shape``); it never looks at a method's name, nor at its kind of
transform or supervision. Any dataset works that yields the items :func:`~learnreg.data.
datasets.collate_pairs` stacks (pairs of files, known-warp synthetic pairs, ...) and says on
which network grid they lie (``dataset.grid``) and how inputs are put on it
(``dataset.preprocessor``): both are saved in every checkpoint, so that prediction puts new
images on the same grid.

Reproducibility: the data order and the augmentation of step ``s`` are pure functions of
``(seed, s, rank)`` (a per-epoch permutation of the pairs, sharded across ranks like
``DistributedSampler``; a generator seeded per step), and checkpoints hold the model,
optimizer, AMP scaler and global RNG states. A run resumed from a checkpoint therefore ends
with the same weights as one that never stopped.

Outputs (rank 0 only) in the output folder::

    config.yaml         resolved configuration
    log.csv             step, time, learning rate, loss terms, validation measures

``config.init`` starts a fresh run from another run's or a shipped model's weights
(fine-tuning); ``config.optimizer.schedule`` sets the learning rate of every step.
    checkpoints/step_0000100.pt, last.pt, best.pt (best validation measure: highest
                        Dice, or lowest transform error or loss; see RegistrationMethod.validate)
    tensorboard/        only if TensorBoard is installed
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from learnreg.core.device import resolve_device
from learnreg.core.errors import InputError
from learnreg.core.files import atomic_write
from learnreg.data.augment import Augmenter
from learnreg.data.datasets import (
    PairDataset,
    atlas_pairs,
    collate_pairs,
    folder_subjects,
    pairs_from_csv,
    subject_pairs,
)
from learnreg.data.fingerprint import atlas_fingerprint
from learnreg.data.prealign import CachedPrealignment
from learnreg.data.preprocess import NetworkGrid, Preprocessor
from learnreg.io.images import read_image
from learnreg.methods.base import RegistrationMethod
from learnreg.train.checkpoint import load_checkpoint, restore_rng_state, save_checkpoint
from learnreg.train.config import TrainConfig
from learnreg.train.outputs import clear_run_folder

__all__ = ["Trainer", "build_datasets", "distributed_env"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- helpers
def distributed_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (``(0, 1, 0)`` alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def build_datasets(
    config: TrainConfig, method: RegistrationMethod | None = None, preload: bool = True
) -> tuple[PairDataset, PairDataset | None]:
    """Training and validation datasets of ``config.data`` on one network grid.

    Pairs of files (``data.images`` folders or ``data.train_csv``) become
    :class:`PairDataset` s; ``data.synthetic`` builds known-warp pairs of real images
    (:func:`learnreg.data.sources.synthetic_datasets`). A fixed-size network's
    ``input_shape`` is the default ``data.shape``.
    """
    data = config.data
    shape = data.shape or (method.input_shape if method is not None else None)
    pre = Preprocessor(
        NetworkGrid(
            tuple(shape) if shape else None,
            tuple(data.spacing) if data.spacing else None,
            data.orientation,
            data.levels,
        ),
        data.percentiles,
    )
    if data.synthetic is not None:
        from learnreg.data.sources import synthetic_datasets

        return synthetic_datasets(data.synthetic, pre)
    if data.train_csv is not None:
        train_pairs = pairs_from_csv(data.train_csv, must_exist=True)
        val_pairs = pairs_from_csv(data.val_csv, must_exist=True) if data.val_csv else []
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
    prealign = CachedPrealignment(data.prealign) if data.prealign else None
    say = _preparation_printer(config, prealign) if preload else None
    t0 = time.perf_counter()
    train_set = PairDataset(
        train_pairs, pre, preload=preload, prealign=prealign, progress=say and say("training")
    )
    val_set = (
        PairDataset(
            val_pairs,
            pre,
            grid=train_set.grid,
            preload=preload,
            prealign=prealign,
            progress=say and say("validation"),
        )
        if val_pairs
        else None
    )
    if say is not None:
        cached = (
            f"; pre-alignments: {prealign.hits} cached, {prealign.misses} computed"
            if prealign
            else ""
        )
        _tell(
            f"data ready in {time.perf_counter() - t0:.1f} s on the network grid {train_set.grid.shape}{cached}"
        )
    return train_set, val_set


def _tell(line: str) -> None:
    print(f"learnreg train: {line}", file=sys.stderr, flush=True)


def _preparation_printer(config: TrainConfig, prealign: CachedPrealignment | None):
    """``say(kind)`` → a PairDataset progress callback printing one line per pair (the main
    process only, when ``config.progress``), or None."""
    if not (config.progress and int(os.environ.get("RANK", "0")) == 0):
        return None

    def say(kind: str):
        doing = f"pre-aligning ({prealign.preset})" if prealign else "reading"

        def progress(done: int, total: int, pair: str) -> None:
            cached = " [cached]" if prealign is not None and prealign.last_was_cached else ""
            _tell(f"{doing} {kind} pairs {done}/{total}: {pair}{cached}")

        return progress

    return say


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the global state
    random.seed(seed)


# ---------------------------------------------------------------------------- trainer
_BEST = (("dice", True), ("error", False), ("loss", False))
"""Validation keys that choose ``best.pt``, in order of preference, and whether higher is
better."""


def _best_key(measures: dict[str, float]) -> tuple[str, bool] | None:
    for key, higher in _BEST:
        if key in measures:
            return key, higher
    return None


class Trainer:
    """Trains ``method`` on ``train_data``; validates with the method's hook on ``val_data``.

    Args:
        config: the resolved configuration (saved with every checkpoint).
        method: a :class:`~learnreg.methods.base.RegistrationMethod`.
        train_data: training pairs: a dataset of items for :func:`collate_pairs` with a
            ``grid`` (the network grid) and a ``preprocessor`` (how inputs reach it).
        val_data: validation pairs (optional), on the same grid.
        output: output folder (default ``config.output``).
        augmenter: default: from ``config.data.augment`` when any augmentation is enabled.
        callback: called as ``callback(trainer, step, losses)`` after every optimizer step
            (on every rank); raising from it stops training without saving (as a crash).
    """

    def __init__(
        self,
        config: TrainConfig,
        method: RegistrationMethod,
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
        self.best_key: str | None = None
        self.best_value: float | None = None
        self.best_step = -1
        self.identity_dice: float | None = None
        self.elapsed = 0.0
        self._perms: dict[int, torch.Tensor] = {}
        self._own_group = False
        self._check_grid()
        self.atlas = self._atlas_fingerprint()

    # ------------------------------------------------------------------ setup
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _atlas_fingerprint(self) -> dict | None:
        """The fixed image's fingerprint when every training pair shares it (atlas-to-subject
        training), recorded so a shipped model is chosen only for that atlas."""
        if not self.config.data.atlas:
            return None
        fixed = {str(p.fixed) for p in self.train_data.pairs}
        if len(fixed) != 1:
            return None
        return atlas_fingerprint(read_image(fixed.pop()))

    def _check_grid(self) -> None:
        """The data's network grid must be one the method's network can take."""
        grid = self.train_data.grid
        ndim = getattr(self.method, "config", {}).get("ndim")
        if ndim is not None and ndim != grid.ndim:
            raise InputError(
                f"config method_config.ndim is {ndim}, but the data are {grid.ndim}D (the "
                f"first image, {self.train_data.pairs[0].fixed}, is on a {grid.ndim}D grid): "
                f"set method_config.ndim to {grid.ndim}, or train on {ndim}D images"
            )
        self._check_projection(grid)
        need = self.method.input_shape
        if need is not None and tuple(grid.shape) != tuple(need):
            raise InputError(
                f"{self.method_name} takes a {tuple(need)} network grid, the data is on "
                f"{grid.shape}: set data.shape to {list(need)}"
            )
        k = self.method.size_multiple
        if any(s % k for s in grid.shape):
            raise InputError(
                f"{self.method_name} needs grid sizes divisible by {k}; the data is on "
                f"{grid.shape} (raise data.levels or set data.shape)"
            )

    def _check_projection(self, grid) -> None:
        """X-ray/volume data (``projection`` datasets) for 2D/3D methods only, rendered with
        the method's imaging system, without image augmentation."""
        data = bool(getattr(self.train_data, "projection", False))
        if data != self.method.projection:
            raise InputError(
                f"{self.method_name} registers X-rays to volumes: train it on data.synthetic: "
                "{kind: drr, ...}"
                if self.method.projection
                else f"{self.method_name} registers images of one dimensionality; the data "
                "pair X-rays with volumes (kind drr is for 2D/3D methods)"
            )
        if not data:
            return
        want = self.method.projection_geometry(grid)
        if self.train_data.geometry != want:
            raise InputError(
                f"the X-rays of data.synthetic are rendered with {self.train_data.geometry}, "
                f"but {self.method_name} images with {want}: give data.synthetic the imaging "
                "system of method_config (detector, pixel_spacing, source_distance, "
                "detector_distance, beam_axis, samples, depth)"
            )
        if self.augmenter is not None:
            raise InputError("data.augment warps images on one grid: turn it off for kind drr")

    def _init_distributed(self) -> None:
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend)
            self._own_group = True

    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One optimizer per parameter group of the method (``config.optimizer``, with the
        per-group settings of ``config.optimizer.groups``)."""
        o = self.config.optimizer
        groups = self.method.parameter_groups()
        unknown = sorted(set(o.groups) - set(groups))
        if unknown:
            raise InputError(
                f"config optimizer.groups: {self.method_name} has no parameter group "
                f"{', '.join(unknown)}; its groups: {', '.join(groups)}"
            )
        out = {}
        for name, params in groups.items():
            own = {k: v for k, v in o.groups.get(name, {}).items() if k != "every"}
            opts = {"lr": o.lr, "weight_decay": o.weight_decay, **own}
            params = list(params)
            if o.name == "adam":
                out[name] = torch.optim.Adam(params, **opts)
            elif o.name == "adamw":
                out[name] = torch.optim.AdamW(params, **opts)
            else:
                out[name] = torch.optim.SGD(params, momentum=o.momentum, **opts)
        return out

    def _lr(self, group: str, step: int) -> float:
        o = self.config.optimizer
        base = float(o.groups.get(group, {}).get("lr", o.lr))
        return o.lr_at(step, self.config.steps) * base / o.lr

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
        return collate_pairs(items, self.train_data.grid, self.method.projection).to(self.device)

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """The method's validation measures (:meth:`RegistrationMethod.validate`), averaged
        over the validation pairs (all ranks), prefixed ``val_``; ``identity_dice`` too when
        the measure is a Dice."""
        if self.val_data is None:
            return {}
        sums: dict[str, float] = {}
        count = 0
        for i in range(self.rank, len(self.val_data), self.world_size):
            item = self.val_data[i]
            batch = collate_pairs([item], self.val_data.grid, self.method.projection)
            batch = batch.to(self.device)
            with torch.autocast(self.device.type, enabled=self.amp):
                out = self.method.predict(batch.fixed, batch.moving, batch.grid)
            for k, v in self.method.validate(batch, out).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            count += 1
        keys = sorted(sums)
        total = torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64)
        if self.world_size > 1:
            t = total.to(self.device) if self.device.type == "cuda" else total
            dist.all_reduce(t)
            total = t.cpu()
        n = max(float(total[-1]), 1.0)
        means = {k: float(v) / n for k, v in zip(keys, total[:-1].tolist(), strict=True)}
        if "identity_dice" in means:
            if self.identity_dice is None:
                self.identity_dice = means["identity_dice"]
            means["identity_dice"] = self.identity_dice
        return {f"val_{k}" if k != "identity_dice" else k: v for k, v in means.items()}

    def _improved(self, val: dict[str, float]) -> bool:
        """Record ``val`` as the best so far when it beats the best (by :data:`_BEST`)."""
        chosen = _best_key({k.removeprefix("val_"): v for k, v in val.items()})
        if chosen is None:
            return False
        key, higher = chosen
        value = val[f"val_{key}"]
        if not math.isfinite(value):
            return False
        best = self.best_value if self.best_key == key else None
        if best is None or (value > best if higher else value < best):
            self.best_key, self.best_value, self.best_step = key, value, self.step
            return True
        return False

    # ------------------------------------------------------------------ checkpoints
    def _extra(self) -> dict:
        return {
            "best_key": self.best_key,
            "best_value": self.best_value,
            "best_step": int(self.best_step),
            "identity_dice": self.identity_dice,
            "elapsed": float(self.elapsed),
            "world_size": int(self.world_size),
            "grid": self.train_data.grid.to_dict(),
            "preprocess": self.train_data.preprocessor.to_dict(),
            **({"atlas": self.atlas} if self.atlas is not None else {}),
        }

    def _save(self, path: Path, optimizers, scaler) -> None:
        try:
            save_checkpoint(
                path,
                model=self.method,
                method=self.method_name,
                step=self.step,
                config=self.config.to_dict(),
                optimizer={name: o.state_dict() for name, o in optimizers.items()},
                scaler=scaler,
                extra=self._extra(),
            )
        except InputError as e:
            raise InputError(
                f"{e}; training stopped at step {self.step}, the checkpoints written before "
                "are intact"
            ) from None

    def _restore(self, optimizers, scaler) -> bool:
        path = self.output / "checkpoints" / "last.pt"
        if not path.is_file():
            return False
        state = load_checkpoint(path, expected_method=self.method_name)
        try:
            self.method.load_state_dict(state["model"])
        except (RuntimeError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(
                f"{path}: the checkpoint's network does not fit this config's method_config "
                f"(another architecture: {first[:160]}); resume with the config it was "
                "trained with"
            ) from None
        saved = state.get("optimizer")
        if saved is not None:
            if set(saved) != set(optimizers):
                raise InputError(
                    f"{path}: optimizer groups {sorted(saved)} differ from the method's "
                    f"{sorted(optimizers)}"
                )
            for name, opt in optimizers.items():
                opt.load_state_dict(saved[name])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        extra = state.get("extra") or {}
        self.step = int(state["step"])
        self.best_key, self.best_value = extra.get("best_key"), extra.get("best_value")
        self.best_step = int(extra.get("best_step", -1))
        self.identity_dice = extra.get("identity_dice")
        self.elapsed = float(extra.get("elapsed", 0.0))
        return True

    def _load_initial_weights(self, source: str) -> None:
        """Start from the weights of the checkpoint or model file ``source`` of the same
        method and architecture (fine-tuning), or of a method in the method's
        ``init_methods`` (an earlier stage trained by another method), as the method's
        ``initial_state`` completes them (staged training). Shipped model names are resolved to their file by the caller
        (``learnreg train``)."""
        path = Path(source)
        if path.is_dir() and (path / "model.pt").is_file():
            path = path / "model.pt"
        if not path.is_file():
            raise InputError(f"init {source}: no such checkpoint or model file")
        sources = (self.method_name, *getattr(self.method, "init_methods", ()))
        state = load_checkpoint(path, expected_method=sources)
        mine = self.method.state_dict()
        theirs = self.method.initial_state(state["model"])
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
            with open(self._log_path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
                fields = list(rows[0].keys()) if rows else None
            rows = [r for r in rows if int(r["step"]) <= self.step]
            if fields:
                self._write_rows(fields, rows, "w")
                self._log_fields = fields
        elif self._log_path.exists():
            self._log_path.unlink()

    def _write_rows(self, fields: list[str], rows: list[dict], mode: str) -> None:
        with open(self._log_path, mode, newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            if mode == "w":
                w.writeheader()
            w.writerows(rows)

    def _log(self, row: dict) -> None:
        """Append ``row`` to log.csv; a column seen for the first time (validation measures
        appear at the first validation) rewrites the file with the wider header."""
        if not self.is_main:
            return
        if self._log_fields is None:
            self._log_fields = list(row)
            self._write_rows(self._log_fields, [row], "w")
        elif set(row) - set(self._log_fields):
            with open(self._log_path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
            self._log_fields += [k for k in row if k not in self._log_fields]
            self._write_rows(self._log_fields, [*rows, row], "w")
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
    def fit(self, resume: bool = False, until: int | None = None, overwrite: bool = False) -> dict:
        """Train to ``config.steps`` (or stop gracefully after step ``until``).

        With ``resume=True`` training continues from ``checkpoints/last.pt`` in the output
        folder when it exists (else starts fresh). ``overwrite`` first removes an earlier
        run's files from the output folder (:func:`~learnreg.train.outputs.clear_run_folder`;
        a fresh run only). Returns a summary dict.
        """
        cfg = self.config
        self._init_distributed()
        try:
            end = cfg.steps if until is None else min(until, cfg.steps)
            return self._fit(resume, end, overwrite)
        finally:
            if self._own_group and dist.is_initialized():
                dist.destroy_process_group()
                self._own_group = False

    def _wrap(self, single_group: bool) -> torch.nn.Module:
        """The module the forward pass runs through: DDP for one optimizer group; with
        several, gradients are averaged across ranks by :meth:`_all_reduce_grads`."""
        if self.world_size > 1 and single_group:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(self.method, device_ids=ids)
        return self.method

    def _all_reduce_grads(self) -> None:
        for p in self.method.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world_size

    def _backward(self, losses: dict, optimizers: dict, scaler) -> list[str]:
        """Gradients of each group's total into that group's parameters only, for the groups
        that step at this step (``optimizer.groups.<name>.every``); returns their names."""
        names = list(optimizers)
        totals = {n: losses["total" if i == 0 else f"total_{n}"] for i, n in enumerate(names)}
        for name, total in totals.items():
            if not torch.isfinite(total):
                raise FloatingPointError(f"loss {name} is {float(total)} at step {self.step + 1}")
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        stepping = [n for n in names if self.config.optimizer.steps_on(n, self.step + 1)]
        if len(names) == 1:
            if stepping:
                scaler.scale(totals[names[0]]).backward()
            return stepping
        groups = self.method.parameter_groups()
        for i, name in enumerate(stepping):
            params = [p for p in groups[name] if p.requires_grad]
            scaler.scale(totals[name]).backward(inputs=params, retain_graph=i < len(stepping) - 1)
        if self.world_size > 1:
            self._all_reduce_grads()
        return stepping

    def _fit(self, resume: bool, end: int, overwrite: bool = False) -> dict:
        cfg = self.config
        self.method.to(self.device)
        optimizers = self._make_optimizers()
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        resumed = resume and self._restore(optimizers, scaler)
        if not resumed:
            _seed_all(cfg.seed)
            if cfg.init:
                self._load_initial_weights(cfg.init)
        if self.is_main:
            if overwrite and not resumed:
                clear_run_folder(self.output)
            try:
                (self.output / "checkpoints").mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise InputError(
                    f"{self.output}: cannot create the run folder ({e.strerror or e})"
                ) from None
            with atomic_write(self.output / "config.yaml") as tmp:
                tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
            self._open_log(resumed)
        self._tb = self._open_tensorboard()
        model = self._wrap(len(optimizers) == 1)
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
                    output = model(batch.fixed, batch.moving, batch.grid)
                    losses = self.method.loss(batch, output)
                for name, opt in optimizers.items():
                    for group in opt.param_groups:
                        group["lr"] = self._lr(name, self.step)
                stepping = self._backward(losses, optimizers, scaler)
                if cfg.optimizer.grad_clip:
                    for name in stepping:
                        scaler.unscale_(optimizers[name])
                    torch.nn.utils.clip_grad_norm_(
                        self.method.parameters(), cfg.optimizer.grad_clip
                    )
                for name in stepping:
                    scaler.step(optimizers[name])
                if stepping:
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
                    row["lr"] = next(iter(optimizers.values())).param_groups[0]["lr"]
                    row.update({k: v / max(nsum, 1) for k, v in sums.items()})
                    row.update(val)
                    self._log(row)
                    sums, nsum = {}, 0
                if progress:
                    progress.update(
                        task, completed=self.step, description=self._describe(losses, last_val)
                    )
                improved = bool(val) and self._improved(val)
                if self.is_main:
                    ckpt = self.output / "checkpoints"
                    if improved:
                        self._save(ckpt / "best.pt", optimizers, scaler)
                    if self.step % cfg.checkpoint_every == 0:
                        self._save(ckpt / f"step_{self.step:07d}.pt", optimizers, scaler)
                    if self.step % cfg.checkpoint_every == 0 or self.step == end:
                        self._save(ckpt / "last.pt", optimizers, scaler)
        finally:
            if progress:
                progress.stop()
            if self._tb is not None:
                self._tb.close()
        return {
            "step": self.step,
            "validation": last_val,
            "identity_dice": self.identity_dice,
            "best_key": self.best_key,
            "best_value": self.best_value,
            "best_step": self.best_step,
            "output": str(self.output),
        }

    @staticmethod
    def _describe(losses: dict, val: dict[str, float]) -> str:
        desc = f"loss {float(losses['total'].detach()):.4f}"
        chosen = _best_key({k.removeprefix("val_"): v for k, v in val.items()})
        if chosen is not None:
            desc += f"  val {chosen[0]} {val['val_' + chosen[0]]:.3f}"
        return desc

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
