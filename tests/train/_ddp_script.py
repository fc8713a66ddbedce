"""Run by ``torchrun --nproc_per_node=2`` in test_ddp.py: train a tiny VoxelMorph a few steps."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from learnreg.train.trainer import Trainer, build_datasets  # noqa: E402
from tests.train.conftest import tiny_vxm  # noqa: E402
from tests.train.test_trainer import _config  # noqa: E402

if __name__ == "__main__":
    out, ants2d = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    cfg = _config(ants2d, out / "run", steps=4, batch_size=1, val_every=2, checkpoint_every=2)
    torch.manual_seed(int(os.environ["RANK"]))  # different init per rank: DDP must sync it
    method = tiny_vxm()
    train, val = build_datasets(cfg, method)
    summary = Trainer(cfg, method, train, val).fit()
    rank = int(os.environ["RANK"])
    torch.save(method.state_dict(), out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(summary))
