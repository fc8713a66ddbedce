"""``learnreg register``: register a pair with a pretrained network or classically, and write
files any ITK tool replays."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch
import yaml

from learnreg.cli.progress import progress_display
from learnreg.core.errors import InputError
from learnreg.core.image import Image
from learnreg.eval.figures import qc_figure
from learnreg.eval.metrics import jacobian_stats, mean_dice
from learnreg.io.images import read_image, read_labels, write_image
from learnreg.io.result import save_result, staged_output, write_json
from learnreg.losses import functional as L
from learnreg.optimize.classical import check_pair, register
from learnreg.optimize.config import ClassicalConfig, preset
from learnreg.spatial.result import RegistrationResult
from learnreg.spatial.sampling import resample
from learnreg.zoo.models import PretrainedModel, available_models, load_model, model_summary
from learnreg.zoo.predict import predict

__all__ = ["run_register", "write_outputs", "choose_model"]


def run_register(
    fixed_path: Path,
    moving_path: Path,
    output: Path,
    preset_name: str,
    config_path: Path | None,
    fixed_labels_path: Path | None,
    moving_labels_path: Path | None,
    quiet: bool,
    method: str = "auto",
    model_path: Path | None = None,
    refine: int = 0,
) -> None:
    cfg = _load_config(config_path) if config_path else _preset(preset_name)
    if refine < 0:
        raise InputError(f"--refine must be >= 0, got {refine}")
    fixed, moving = read_image(fixed_path), read_image(moving_path)
    fixed_labels = read_labels(fixed_labels_path) if fixed_labels_path else None
    moving_labels = read_labels(moving_labels_path) if moving_labels_path else None
    for lab, img in ((fixed_labels, fixed), (moving_labels, moving)):
        if lab is not None and not lab.grid.allclose(img.grid, atol=1e-3):
            raise InputError(f"{lab.name}: label map grid differs from its image {img.name}")
    check_pair(fixed, moving)  # before anything is written
    classical_asked = config_path is not None or preset_name != "default"
    model, why = choose_model(fixed, moving, method, model_path, classical_asked)
    if refine and model is None:
        raise InputError(
            "--refine N refines a network's prediction: use it with a learned model "
            f"(--method NAME or --model PATH); {why}"
        )
    if not quiet:
        print(f"learnreg register: {why}")
    with staged_output(output) as stage:
        t0 = time.perf_counter()
        with progress_display(quiet) as progress:
            if model is None:
                result = register(fixed, moving, cfg, progress=progress)
            else:
                result = predict(fixed, moving, model, refine, progress=progress)
        result.info["seconds"] = time.perf_counter() - t0
        result.info["engine"] = why
        write_outputs(result, fixed, moving, stage, fixed_labels, moving_labels)
    if not quiet:
        print(f"wrote {output}/ (warped.nii.gz, transforms, jacobian, qc.png, metrics.json)")


def choose_model(
    fixed: Image,
    moving: Image,
    method: str = "auto",
    model_path: Path | None = None,
    classical_asked: bool = False,
) -> tuple[PretrainedModel | None, str]:
    """The trained model to use (or None for classical registration) and a line saying why.

    ``model_path`` wins; ``method`` is ``auto`` (a shipped model when one suits the pair and
    no classical preset or config was asked for, else classical), ``classical``, a shipped
    model's name, or a method name with a shipped model.
    """
    if model_path is not None:
        model = load_model(model_path)
        return model, _using(model, fixed, moving, forced=True)
    key = method.strip().lower()
    if key == "classical" or (key == "auto" and classical_asked):
        return None, "using classical registration (as asked)"
    shipped = available_models()
    if key == "auto":
        reasons = []
        for name in shipped:
            model = load_model(name)
            why = model.unsuitable(fixed, moving)
            if why is None:
                return model, _using(model, fixed, moving)
            reasons.append(f"{name}: {why}")
        detail = "; ".join(reasons) if reasons else "no pretrained model is installed"
        return None, f"using classical registration (no pretrained model suits: {detail})"
    for name in shipped:
        model = load_model(name)
        if key in (name.lower(), model.method.name):
            return model, _using(model, fixed, moving, forced=True)
    raise InputError(
        f"--method {method}: no pretrained model of that name or method (shipped: "
        f"{', '.join(shipped) or 'none'}); use --method classical, or train one with "
        "`learnreg train` and pass --model PATH"
    )


def _using(model: PretrainedModel, fixed: Image, moving: Image, forced: bool = False) -> str:
    steps = f" after {model.prealign} alignment" if model.prealign else ""
    line = f"using pretrained model {model_summary(model)}{steps}"
    why = model.unsuitable(fixed, moving) if forced else None
    return line + (f" — warning: {why}" if why else "")


def write_outputs(
    result: RegistrationResult,
    fixed: Image,
    moving: Image,
    folder: Path,
    fixed_labels: Image | None = None,
    moving_labels: Image | None = None,
) -> dict:
    """Write warped image, transforms, Jacobian map, QC figure and metrics into ``folder``."""
    warped = result.warp(moving)
    write_image(warped, folder / "warped.nii.gz")
    save_result(result, folder)
    jac = result.jacobian_determinant()
    write_image(Image(jac[None], result.fixed_grid, "jacobian"), folder / "jacobian.nii.gz")
    metrics: dict = {"seconds": result.info.get("seconds")}
    metrics["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    moved_affine = resample(moving, fixed.grid, result.linear())
    with torch.no_grad():
        f = fixed.batch().float()
        metrics["lncc_affine"] = -float(L.lncc(f, moved_affine.batch(), window=9))
        metrics["lncc_final"] = -float(L.lncc(f, warped.batch(), window=9))
    if result.deformable is not None:
        metrics["jacobian"] = jacobian_stats(result.deformable.voxel_field())
    if fixed_labels is not None and moving_labels is not None:
        warped_labels = result.warp(moving_labels, mode="label")
        moved_labels = resample(moving_labels, fixed.grid, result.linear(), mode="label")
        write_image(warped_labels, folder / "warped_labels.nii.gz")
        metrics["dice_affine"] = mean_dice(fixed_labels.data[0], moved_labels.data[0])
        metrics["dice"] = mean_dice(fixed_labels.data[0], warped_labels.data[0])
    qc_figure(
        fixed.data[0].numpy(),
        resample(moving, fixed.grid).data[0].numpy(),
        warped.data[0].numpy(),
        folder / "qc.png",
        displacement=None
        if result.deformable is None
        else result.deformable.voxel_field()[0].numpy(),
        jacobian=jac.numpy() if result.deformable is not None else None,
        title=f"{moving.name} → {fixed.name}",
        grid=fixed.grid,
    )
    write_json(folder / "metrics.json", metrics)
    return metrics


def _preset(name: str) -> ClassicalConfig:
    try:
        return preset(name)
    except ValueError as e:
        raise InputError(f"--preset: {e}") from None


def _load_config(path: Path) -> ClassicalConfig:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise InputError(f"{path}: cannot read config ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise InputError(f"{path}: invalid YAML ({e})") from None
    try:
        return ClassicalConfig.from_dict(data or {})
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: {e}") from None
