"""Networks that regress a few transform parameters from an image pair.

The pieces shared by the parameter-regression methods (homography, rigid, affine, …):

- :class:`VGGEncoder`: a stack of ``conv 3 → [norm] → ReLU`` blocks (:class:`~learnreg.nn.
  blocks.ConvBlock` with a negative slope of 0) with configurable downsampling after chosen
  layers — max pooling (DeTone et al. 2016's VGG-style HomographyNet), average pooling, a
  stride-2 convolution, or none at all — and an optional CoordConv first layer;
- :class:`PairEncoder`: how the two images meet — ``"two-channel"`` (early fusion: one
  encoder on the channel-stacked pair, as HomographyNet), ``"siamese"`` (one tower with
  shared weights applied to each image, features concatenated, then an optional merged
  trunk, as Nowruzi et al. 2017's twin modules) or ``"pseudo-siamese"`` (two towers of the
  same architecture without shared weights);
- :class:`RegressionHead`: flatten → fully connected layers (ReLU, dropout) → the
  parameters, the last layer initialized with small (or zero) weights and a given bias, so
  the untrained network predicts the identity (or any chosen starting point);
- :class:`ParameterRegressor`: a :class:`PairEncoder` and a :class:`RegressionHead`.

All modules work in 2D or 3D (``ndim``) on tensors ``(N, C, *S)``; the head needs a fixed
input size (fully connected layers), which :meth:`PairEncoder.output_shape` computes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from learnreg.core.options import check_option
from learnreg.nn.blocks import ConvBlock, CoordConv

__all__ = [
    "POOLINGS",
    "HEAD_NORMS",
    "PAIR_MODES",
    "VGGEncoder",
    "PairEncoder",
    "RegressionHead",
    "ParameterRegressor",
]

POOLINGS = ("max", "avg", "stride", None)
HEAD_NORMS = (None, "batch")
PAIR_MODES = ("two-channel", "siamese", "pseudo-siamese")


def _positive_ints(name: str, values: Sequence[int], allow_empty: bool = False) -> list[int]:
    out = [int(v) for v in values]
    if (not out and not allow_empty) or any(v < 1 for v in out):
        raise ValueError(f"{name} must be a non-empty list of positive ints, got {list(values)}")
    return out


class VGGEncoder(nn.Module):
    """VGG-style encoder: ``conv 3×3 → [norm] → ReLU`` blocks, downsampled after chosen layers.

    Args:
        ndim: 2 or 3 spatial dimensions.
        in_channels: input channels (2 for a channel-stacked pair).
        features: output channels of each conv block (DeTone et al.'s HomographyNet:
            ``(64, 64, 64, 64, 128, 128, 128, 128)``).
        downsample_after: 0-based indices of the blocks after which the size is halved
            (HomographyNet: ``(1, 3, 5)``, i.e. after every two convolutions but the last pair).
        pooling: ``"max"`` (2×2 max pooling, HomographyNet), ``"avg"``, ``"stride"`` (those
            blocks convolve with stride 2 instead; no pooling layer) or None (no downsampling:
            ``downsample_after`` is ignored and the output keeps the input size).
        norm: None, ``"batch"`` (HomographyNet), ``"instance"`` or ``"group"``.
        coord_conv: the first block is a :class:`~learnreg.nn.blocks.CoordConv` (normalized
            coordinate channels appended to the input).
        negative_slope: of the (leaky) ReLU; 0 is the plain ReLU of VGG.
        activation: ``"leaky_relu"`` (with ``negative_slope``) or ``"elu"``.
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        features: Sequence[int] = (64, 64, 64, 64, 128, 128, 128, 128),
        downsample_after: Sequence[int] = (1, 3, 5),
        pooling: str | None = "max",
        norm: str | None = "batch",
        coord_conv: bool = False,
        negative_slope: float = 0.0,
        activation: str = "leaky_relu",
    ) -> None:
        super().__init__()
        check_option("pooling", pooling, POOLINGS)
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        feats = _positive_ints("features", features)
        down = sorted({int(i) for i in downsample_after}) if pooling is not None else []
        bad = [i for i in down if not 0 <= i < len(feats)]
        if bad:
            raise ValueError(
                f"downsample_after indices {bad} are outside the {len(feats)} conv blocks"
            )
        self.ndim, self.in_channels, self.pooling = ndim, int(in_channels), pooling
        self.downsample_after = tuple(down)
        self.out_channels = feats[-1]
        layers: list[nn.Module] = []
        prev = self.in_channels
        for i, f in enumerate(feats):
            stride = 2 if (pooling == "stride" and i in down) else 1
            opts = {
                "stride": stride,
                "norm": norm,
                "negative_slope": negative_slope,
                "activation": activation,
            }
            if i == 0 and coord_conv:
                layers.append(CoordConv(ndim, prev, f, **opts))
            else:
                layers.append(ConvBlock(ndim, prev, f, **opts))
            if pooling in ("max", "avg") and i in down:
                pool = {
                    ("max", 2): nn.MaxPool2d,
                    ("max", 3): nn.MaxPool3d,
                    ("avg", 2): nn.AvgPool2d,
                    ("avg", 3): nn.AvgPool3d,
                }[(pooling, ndim)]
                layers.append(pool(2))
            prev = f
        self.layers = nn.Sequential(*layers)

    @property
    def factor(self) -> int:
        """Total downsampling factor ``2**len(downsample_after)``."""
        return 2 ** len(self.downsample_after)

    def output_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial size of the output for an input of spatial size ``shape``."""
        out = [int(s) for s in shape]
        for _ in self.downsample_after:
            if self.pooling == "stride":  # conv kernel 3, padding 1, stride 2
                out = [(s - 1) // 2 + 1 for s in out]
            else:
                out = [s // 2 for s in out]
        return tuple(out)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.ndim + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"VGGEncoder: expected (N, {self.in_channels}, *S) with {self.ndim} spatial "
                f"dims, got {tuple(x.shape)}"
            )
        return self.layers(x)


class PairEncoder(nn.Module):
    """Features of an image pair ``(fixed, moving)``, each ``(N, C, *S)``.

    Args:
        ndim: 2 or 3.
        mode: ``"two-channel"`` — one :class:`VGGEncoder` on ``cat([fixed, moving])`` (early
            fusion); ``"siamese"`` — one tower (shared weights) applied to each image, the two
            feature maps concatenated (late fusion); ``"pseudo-siamese"`` — two towers with
            the same architecture but their own weights.
        in_channels: channels of each image.
        features, downsample_after: of the two-channel encoder, or of each tower.
        merge_features, merge_downsample_after: optional conv blocks applied to the
            concatenated tower features (siamese modes only; ignored by two-channel).
        pooling, norm, coord_conv, negative_slope, activation: as :class:`VGGEncoder` (CoordConv applies
            to the first block of each tower / of the two-channel encoder).
    """

    def __init__(
        self,
        ndim: int = 2,
        mode: str = "two-channel",
        in_channels: int = 1,
        features: Sequence[int] = (64, 64, 64, 64, 128, 128, 128, 128),
        downsample_after: Sequence[int] = (1, 3, 5),
        merge_features: Sequence[int] = (),
        merge_downsample_after: Sequence[int] = (),
        pooling: str | None = "max",
        norm: str | None = "batch",
        coord_conv: bool = False,
        negative_slope: float = 0.0,
        activation: str = "leaky_relu",
    ) -> None:
        super().__init__()
        check_option("mode", mode, PAIR_MODES)
        self.ndim, self.mode, self.in_channels = ndim, mode, int(in_channels)
        opts = {
            "pooling": pooling,
            "norm": norm,
            "negative_slope": negative_slope,
            "activation": activation,
        }
        if mode == "two-channel":
            self.tower = VGGEncoder(
                ndim,
                2 * self.in_channels,
                features,
                downsample_after,
                coord_conv=coord_conv,
                **opts,
            )
            self.other_tower = None
            self.merge = None
            self.out_channels = self.tower.out_channels
            return
        self.tower = VGGEncoder(
            ndim, self.in_channels, features, downsample_after, coord_conv=coord_conv, **opts
        )
        self.other_tower = (
            VGGEncoder(
                ndim, self.in_channels, features, downsample_after, coord_conv=coord_conv, **opts
            )
            if mode == "pseudo-siamese"
            else None
        )
        merged = 2 * self.tower.out_channels
        merge = _positive_ints("merge_features", merge_features, allow_empty=True)
        if merge:
            self.merge = VGGEncoder(ndim, merged, merge, merge_downsample_after, **opts)
            self.out_channels = self.merge.out_channels
        else:
            self.merge = None
            self.out_channels = merged

    def output_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """``(channels, *spatial)`` of the features for images of spatial size ``shape``."""
        s = self.tower.output_shape(shape)
        if self.merge is not None:
            s = self.merge.output_shape(s)
        return (self.out_channels, *s)

    def forward(self, fixed: Tensor, moving: Tensor) -> Tensor:
        if fixed.shape != moving.shape:
            raise ValueError(
                f"PairEncoder: fixed and moving must have the same shape; got "
                f"{tuple(fixed.shape)} and {tuple(moving.shape)}"
            )
        if fixed.dim() != self.ndim + 2 or fixed.shape[1] != self.in_channels:
            raise ValueError(
                f"PairEncoder: images must be (N, {self.in_channels}, *S) with {self.ndim} "
                f"spatial dims; got {tuple(fixed.shape)}"
            )
        if self.mode == "two-channel":
            return self.tower(torch.cat([fixed, moving], 1))
        if self.other_tower is None:  # siamese: one pass over both images, shared weights
            both = self.tower(torch.cat([fixed, moving], 0))
            f, m = both.chunk(2, 0)
        else:
            f, m = self.tower(fixed), self.other_tower(moving)
        x = torch.cat([f, m], 1)
        return x if self.merge is None else self.merge(x)


class RegressionHead(nn.Module):
    """Flatten → ``Linear → ReLU → Dropout`` per hidden layer → ``Linear`` to the parameters.

    Args:
        in_features: flattened size of the features (``prod(PairEncoder.output_shape(...))``).
        out_features: number of regressed parameters (8 for a 4-corner homography).
        hidden: widths of the hidden fully connected layers (HomographyNet: ``(1024,)``).
        dropout: dropout probability before each hidden layer's input and after each hidden
            layer (HomographyNet: 0.5 after the last conv and after the first FC; 0 disables).
        init_std: standard deviation of the last layer's initial weights; 0 gives zero
            weights. Small or zero weights make the first prediction (almost) ``bias``.
        bias: initial bias of the last layer (``(out_features,)``; default zeros), e.g. the
            identity's parameters, so that the untrained network predicts the identity.
        norm: None, or ``"batch"``: batch normalization of each hidden layer before its ReLU
            (keeps hidden units alive while the near-zero last layer gives them only noise to
            follow; see :class:`learnreg.methods.homography.HierarchicalHomographyNet`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (1024,),
        dropout: float = 0.5,
        init_std: float = 1e-3,
        bias: Tensor | Sequence[float] | None = None,
        norm: str | None = None,
    ) -> None:
        super().__init__()
        check_option("head norm", norm, HEAD_NORMS)
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"RegressionHead: in_features and out_features must be positive, got "
                f"{in_features} and {out_features}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if init_std < 0:
            raise ValueError(f"init_std must be >= 0, got {init_std}")
        widths = _positive_ints("hidden", hidden, allow_empty=True)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.norm = norm
        layers: list[nn.Module] = [nn.Flatten()]
        prev = self.in_features
        for w in widths:
            if dropout:
                layers.append(nn.Dropout(dropout))
            layers.append(nn.Linear(prev, w, bias=norm is None))
            if norm == "batch":
                layers.append(nn.BatchNorm1d(w))
            layers.append(nn.ReLU(inplace=True))
            prev = w
        if dropout and widths:
            layers.append(nn.Dropout(dropout))
        self.hidden = nn.Sequential(*layers)
        self.out = nn.Linear(prev, self.out_features)
        with torch.no_grad():
            if init_std > 0:
                nn.init.normal_(self.out.weight, 0.0, init_std)
            else:
                nn.init.zeros_(self.out.weight)
            b = torch.zeros(self.out_features) if bias is None else torch.as_tensor(bias)
            if b.shape != (self.out_features,):
                raise ValueError(
                    f"RegressionHead: bias must have shape ({self.out_features},), got "
                    f"{tuple(b.shape)}"
                )
            self.out.bias.copy_(b.to(self.out.bias.dtype))

    def forward(self, x: Tensor) -> Tensor:
        if x[0].numel() != self.in_features:
            raise ValueError(
                f"RegressionHead: expected {self.in_features} features per item, got "
                f"{x[0].numel()} (input {tuple(x.shape)}); the encoder's input size must match "
                f"the size the head was built for"
            )
        if self.norm == "batch" and self.training and x.shape[0] < 2:
            raise ValueError(
                "RegressionHead: batch normalization of the hidden layers needs batches of at "
                "least 2 items in training (use batch_size >= 2, or no head norm)"
            )
        return self.out(self.hidden(x))


class ParameterRegressor(nn.Module):
    """:class:`PairEncoder` → :class:`RegressionHead`: ``(fixed, moving) → (N, out_features)``.

    Args:
        ndim: 2 or 3.
        shape: the (fixed) spatial input size the fully connected head is built for.
        out_features: number of parameters.
        encoder: keyword arguments of :class:`PairEncoder` (``mode``, ``features``, …).
        head: keyword arguments of :class:`RegressionHead` (``hidden``, ``dropout``, …).
    """

    def __init__(
        self,
        ndim: int,
        shape: Sequence[int],
        out_features: int,
        encoder: dict | None = None,
        head: dict | None = None,
    ) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != ndim or any(s < 1 for s in self.shape):
            raise ValueError(f"shape must be {ndim} positive sizes, got {tuple(shape)}")
        self.encoder = PairEncoder(ndim, **(encoder or {}))
        out = self.encoder.output_shape(self.shape)
        if any(s < 1 for s in out[1:]):
            raise ValueError(
                f"input size {self.shape} is too small for {len(self.encoder.tower.downsample_after)}"
                f" downsamplings (features {out})"
            )
        n = 1
        for s in out:
            n *= s
        self.head = RegressionHead(n, out_features, **(head or {}))

    def forward(self, fixed: Tensor, moving: Tensor) -> Tensor:
        if tuple(fixed.shape[2:]) != self.shape:
            raise ValueError(
                f"ParameterRegressor: built for images of size {self.shape}, got "
                f"{tuple(fixed.shape[2:])} (input {tuple(fixed.shape)})"
            )
        return self.head(self.encoder(fixed, moving))
