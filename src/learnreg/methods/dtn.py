"""Diffeomorphic transformer network (Detlefsen, Freifeld and Hauberg, CVPR 2018).

"Deep diffeomorphic transformer networks" replaced the affine spatial transformer of Jaderberg
et al. by a CPAB layer: a localisation network regresses the parameters ``θ`` of a
continuous piecewise-affine velocity field on a fixed tessellation, and the layer warps the
image by its integral ``T^θ`` — a diffeomorphism by construction, with the continuity
constraint built into ``θ`` (a basis of its null space), integrated in closed form per cell
(:mod:`learnreg.spatial.cpab`). The paper trained the transformer inside a classifier
(the class label as the only supervision); as a registration method here the same layer is
driven by a pair: the localisation network sees fixed and moving stacked
(:class:`learnreg.nn.regression.ParameterRegressor`), and the loss is the image similarity
of the warped moving image to the fixed one (MSE by default; any registered similarity)
plus a Gaussian prior on ``θ`` (``prior_weight · mean θ²``, θ in the orthonormal basis —
Freifeld's prior with identity covariance); no labels.

Scaled down for CPUs (documented, configurable): the localisation network is conv 3×3 blocks
of 16, 32, 64 channels with batch norm and 2× max pooling, one hidden layer of 128 units, on
64×64 slices; the tessellation 4×4 rectangles of four triangles (zero velocity on the
boundary: 50 parameters); 10 in-cell steps and 5 midpoint substeps at crossings (against a
fine RK4 of the same velocity: under 1e-4 of the domain, :mod:`tests.spatial.test_cpab`). 2D only
(the paper's layer: 1D and 2D; tetrahedral 3D cells are not implemented).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from learnreg.core.grid import Grid
from learnreg.losses.terms import LossSpec, LossTerms
from learnreg.methods.base import MethodOutput, RegistrationBatch, RegistrationMethod, unit_grid
from learnreg.methods.registry import register_method
from learnreg.nn.regression import ParameterRegressor
from learnreg.spatial.cpab import CPABTransform, Tessellation
from learnreg.spatial.frame import GridFrame

__all__ = ["DiffeomorphicTransformerNetwork"]


@register_method(
    "dtn-cpab",
    year=2018,
    ndim="2D",
    transform="CPAB diffeomorphism (continuous piecewise-affine velocity)",
    loss="image similarity (MSE) + Gaussian prior on θ",
    supervision="unsupervised",
    reference="Detlefsen et al., CVPR 2018",
    aliases=("dtn", "cpab", "detlefsen", "detlefsen2018"),
)
class DiffeomorphicTransformerNetwork(RegistrationMethod):
    """Localisation network → CPAB parameters ``θ`` → ``T^θ`` (module docstring).

    Args:
        ndim: 2.
        shape: the network grid size (the fully connected head is built for it).
        cells: rectangles per axis of the tessellation (four triangles each).
        zero_boundary: zero velocity on the grid's border.
        steps, substeps: the CPAB integration (:func:`learnreg.spatial.cpab.integrate`).
        features, hidden: the localisation network's conv channels and hidden units.
        similarity: the image term (a registered similarity, or weighted terms).
        prior_weight: weight of ``mean θ²``.
        coord_conv: CoordConv first layer of the localisation network.

    ``extras["theta"]``: ``(N, d)``.
    """

    def __init__(
        self,
        ndim: int = 2,
        shape: Sequence[int] = (64, 64),
        cells: Sequence[int] = (4, 4),
        zero_boundary: bool = True,
        steps: int = 10,
        substeps: int = 5,
        features: Sequence[int] = (16, 32, 64),
        hidden: Sequence[int] = (128,),
        similarity: LossSpec = "mse",
        prior_weight: float = 0.01,
        coord_conv: bool = False,
    ) -> None:
        super().__init__()
        if ndim != 2:
            raise ValueError(
                f"dtn-cpab: 2D only (tetrahedral 3D cells are not implemented), got ndim={ndim}"
            )
        self.ndim = 2
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 2:
            raise ValueError(f"dtn-cpab: shape must be 2 sizes, got {tuple(shape)}")
        self.tessellation = Tessellation(cells, zero_boundary)
        self.steps, self.substeps = int(steps), int(substeps)
        self.prior_weight = float(prior_weight)
        encoder = {
            "features": tuple(features),
            "downsample_after": tuple(range(len(features))),
            "coord_conv": coord_conv,
        }
        head = {"hidden": tuple(hidden), "init_std": 1e-3}
        self.net = ParameterRegressor(2, self.shape, self.tessellation.dim, encoder, head)
        self.similarity_terms = LossTerms(similarity, "similarity")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.shape

    def forward(self, fixed: Tensor, moving: Tensor, grid: Grid | None = None) -> MethodOutput:
        if fixed.shape != moving.shape or fixed.dim() != 4 or tuple(fixed.shape[2:]) != self.shape:
            raise ValueError(
                f"dtn-cpab: fixed and moving must be (N, 1, {self.shape[0]}, {self.shape[1]}); got "
                f"{tuple(fixed.shape)} and {tuple(moving.shape)}"
            )
        grid = grid if grid is not None else unit_grid(fixed)
        theta = self.net(fixed, moving)
        cpab = CPABTransform(self.tessellation, theta, self.shape, self.steps, self.substeps)
        return MethodOutput(GridFrame(cpab, grid), grid, moving, {"theta": theta})

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        sim = self.similarity_terms(batch.fixed, output.warped)
        prior = output.extras["theta"].pow(2).mean()
        total = sim["total"] + self.prior_weight * prior
        return {"similarity": sim["total"], "prior": prior, "total": total}
