"""Adam for the few parameters of a classical registration, without ``torch.optim``.

The first ``torch.optim`` optimizer a process builds imports ``torch._dynamo`` (about 0.7 s
on two cores, 1.4 s on a loaded machine: more than a whole 1 mm affine registration), so
``learnreg register`` would pay it on every call. This is the same update as
``torch.optim.Adam`` with its defaults (β = 0.9, 0.999, ε = 1e-8, no weight decay;
Kingma & Ba 2015), checked against it in the tests.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["Adam"]


class Adam:
    """Adam on ``params`` with learning rate ``lr``: ``zero_grad()``, ``step()``."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params = list(params)
        self.lr, self.betas, self.eps = float(lr), betas, float(eps)
        self.steps = 0
        self._m = [torch.zeros_like(p) for p in self.params]
        self._v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.steps, 1 - b2**self.steps
        for p, m, v in zip(self.params, self._m, self._v, strict=True):
            if p.grad is None:
                continue
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v.sqrt() / c2**0.5).add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / c1)
