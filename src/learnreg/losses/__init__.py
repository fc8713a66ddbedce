"""Similarity losses, transformation errors and regularizers: functions and ``nn.Module`` wrappers.

Every loss is to be minimized; see :mod:`learnreg.losses.functional` for the conventions.
Three layers:

* :mod:`~learnreg.losses.functional`: stateless functions (``lncc(fixed, moving, window=9)``);
* :mod:`~learnreg.losses.modules`: one ``nn.Module`` per function, with its options fixed at
  construction and a ``kind`` (``similarity``, ``label``, ``transform``, ``regularizer``,
  ``inverse_consistency``) saying how it is called, in a registry of names and aliases
  (:func:`create_loss`, :func:`available_losses`, :func:`register_loss` for your own);
* :mod:`~learnreg.losses.terms`: :class:`LossTerms`, named weighted terms of one kind built from
  a config spec. Methods and classical presets declare their losses this way, e.g. in YAML::

      method: voxelmorph
      method_config:
        similarity: {lncc: {window: 9}}            # name: options (weight 1)
        regularization: {diffusion: 1.0}           # name: weight
      # or several terms, with weights and options together:
      #   similarity: {lncc: {window: 5, weight: 1.0}, mse: 0.1}
      #   regularization: {diffusion: 0.5, bending: {weight: 0.1}}

  ``LossTerms(spec, "similarity")(fixed, warped)`` returns every term's unweighted value by
  name and their weighted ``"total"``; a misspelt name, an option the loss does not take or a
  loss of the wrong kind (``regularization: {lncc: 1}``) raises at construction with the
  valid list.
"""

from learnreg.losses.functional import (
    bending_energy,
    dice,
    diffusion,
    field_l1,
    field_l2,
    folding_penalty,
    grid_point_distance,
    inverse_consistency,
    l1,
    lncc,
    mse,
    multiscale_dice,
    mutual_information,
    ncc,
    parameter_mse,
    ssim,
    total_variation,
)
from learnreg.losses.modules import (
    KINDS,
    BendingEnergyRegularizer,
    DiceLoss,
    DiffusionRegularizer,
    FieldL1Loss,
    FieldL2Loss,
    FoldingRegularizer,
    FunctionalLoss,
    GridPointDistanceLoss,
    InverseConsistencyLoss,
    L1Loss,
    LNCCLoss,
    MILoss,
    MSELoss,
    MultiScaleDiceLoss,
    NCCLoss,
    ParameterMSELoss,
    SSIMLoss,
    TotalVariationRegularizer,
    available_losses,
    create_loss,
    loss_class,
    register_loss,
)
from learnreg.losses.terms import LossSpec, LossTerms, TermSpec, parse_loss_spec

__all__ = [
    "bending_energy",
    "dice",
    "diffusion",
    "field_l1",
    "field_l2",
    "folding_penalty",
    "grid_point_distance",
    "inverse_consistency",
    "l1",
    "lncc",
    "mse",
    "multiscale_dice",
    "mutual_information",
    "ncc",
    "parameter_mse",
    "ssim",
    "total_variation",
    "BendingEnergyRegularizer",
    "DiceLoss",
    "DiffusionRegularizer",
    "FieldL1Loss",
    "FieldL2Loss",
    "FoldingRegularizer",
    "FunctionalLoss",
    "GridPointDistanceLoss",
    "InverseConsistencyLoss",
    "L1Loss",
    "LNCCLoss",
    "MILoss",
    "MSELoss",
    "MultiScaleDiceLoss",
    "NCCLoss",
    "ParameterMSELoss",
    "SSIMLoss",
    "TotalVariationRegularizer",
    "KINDS",
    "available_losses",
    "create_loss",
    "loss_class",
    "register_loss",
    "LossSpec",
    "LossTerms",
    "TermSpec",
    "parse_loss_spec",
]
