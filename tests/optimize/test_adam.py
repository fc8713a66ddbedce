"""The classical optimizer's Adam is torch.optim.Adam's update (without its import)."""

from __future__ import annotations

import torch

from learnreg.optimize.adam import Adam


def test_adam_matches_torch_optim():
    torch_p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    ours_p = torch.nn.Parameter(torch_p.detach().clone())
    ref, ours = torch.optim.Adam([torch_p], lr=0.05), Adam([ours_p], lr=0.05)
    for step in range(30):
        for p, opt in ((torch_p, ref), (ours_p, ours)):
            opt.zero_grad()
            ((p - torch.tensor([0.3, 0.1, -1.0])) ** 2 * (1 + step)).sum().backward()
            opt.step()
    torch.testing.assert_close(ours_p.detach(), torch_p.detach(), rtol=0, atol=1e-6)


def test_the_classical_path_never_imports_dynamo():
    """torch.optim's first optimizer imports torch._dynamo (0.7 s): registration avoids it."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from learnreg.core.grid import Grid\n"
        "from learnreg.core.image import Image\n"
        "from learnreg.optimize.classical import register\n"
        "g = Grid((32, 32), (2.0, 2.0))\n"
        "y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing='ij')\n"
        "f = Image((torch.exp(-((y - 16) ** 2 + (x - 15) ** 2) / 40))[None], g, 'f')\n"
        "m = Image((torch.exp(-((y - 14) ** 2 + (x - 17) ** 2) / 50))[None], g, 'm')\n"
        "register(f, m, 'default')\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
