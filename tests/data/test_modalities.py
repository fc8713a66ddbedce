"""The T2-like twin of LPBA40 T1 images and the cross-modality pairs built from them."""

from __future__ import annotations

import pytest
import torch

from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.data.modalities import (
    ModalityPairs,
    bias_field,
    modality_pair_source,
    second_modality,
    t2_like,
)
from learnreg.data.preprocess import NetworkGrid, Preprocessor
from learnreg.data.sources import source_kinds
from learnreg.io.images import read_image


def test_t2_like_inverts_tissue_order_and_keeps_background_dark() -> None:
    csf, gm, wm = t2_like(torch.tensor([0.25, 0.6, 0.85])).tolist()
    assert csf > gm > wm > 0.2  # T2 order: CSF brightest, white matter darkest
    assert float(t2_like(torch.zeros(3)).abs().max()) == 0.0  # background stays 0
    # non-monotonic: values just above the background are brighter than white matter
    assert float(t2_like(torch.tensor(0.12))) > float(t2_like(torch.tensor(0.85)))
    with pytest.raises(ValueError, match="threshold"):
        t2_like(torch.ones(2), threshold=0.0)


def test_bias_field_is_smooth_positive_and_seeded() -> None:
    b = bias_field((40, 48, 40), seed=3)
    assert b.shape == (40, 48, 40) and float(b.min()) > 0
    assert torch.equal(b, bias_field((40, 48, 40), seed=3))
    assert not torch.equal(b, bias_field((40, 48, 40), seed=4))
    log_b = b.log()
    assert 0.05 < float(log_b.std()) < 0.3  # strength 0.15 of a unit normal lattice
    # smooth: neighbouring voxels differ by a small fraction of the field's range
    assert float(torch.diff(log_b, dim=0).abs().max()) < 0.1 * float(log_b.max() - log_b.min())


def test_second_modality_is_aligned_and_subject_specific(lpba) -> None:
    t1 = read_image(lpba / "images" / "S11.nii.gz")
    a, b = second_modality(t1), second_modality(t1)
    assert a.grid == t1.grid and torch.equal(a.data, b.data)
    assert torch.equal(a.data == 0, t1.data.clamp(0, 1) == 0)  # same brain outline
    brain = t1.data > 0.05
    corr = torch.corrcoef(torch.stack([t1.data[brain].float(), a.data[brain]]))[0, 1]
    assert corr < -0.5  # inside the brain the contrast is inverted
    other = second_modality(Image(t1.data, t1.grid, "S12"))
    assert not torch.equal(other.data, a.data)  # each subject its own bias field


def _pairs(moving_modality: str = "t1") -> ModalityPairs:
    grid = Grid((8, 8))
    t1 = {n: Image(torch.rand(1, 8, 8) * (i + 1), grid, n) for i, n in enumerate("abc")}
    t2 = {n: Image(-im.data, grid, n) for n, im in t1.items()}
    labels = {n: Image(torch.ones(1, 8, 8, dtype=torch.int64), grid, n) for n in "abc"}
    pre = Preprocessor(NetworkGrid((8, 8)), percentiles=None)
    return ModalityPairs(
        {"t1": t1, "t2-like": t2}, labels, "a", ["b", "c"], moving_modality, grid, pre, 5
    )


@pytest.mark.parametrize("moving_modality", ["t1", "t2-like"])
def test_items_carry_each_images_counterpart(moving_modality) -> None:
    pairs = _pairs(moving_modality)
    sign = 1 if moving_modality == "t1" else -1
    item = pairs[3]  # subject "c"
    assert item["names"] == ("a", "c") and len(pairs) == 5
    t1 = pairs.images["t1"]
    assert torch.equal(item["moving"], sign * t1["c"])
    assert torch.equal(item["fixed"], -sign * t1["a"])
    assert torch.equal(item["target"][:1], sign * t1["a"])  # fixed subject, moving modality
    assert torch.equal(item["target"][1:], -sign * t1["c"])  # moving subject, fixed modality
    assert item["fixed_labels"].shape == (1, 8, 8)
    with pytest.raises(IndexError):
        pairs[5]


def test_bad_pairs_are_refused() -> None:
    with pytest.raises(ValueError, match="ct"):
        _pairs("ct")


def test_source_is_registered_and_checks_its_options(lpba) -> None:
    assert "modality-pairs" in source_kinds()
    pre = Preprocessor(NetworkGrid((20, 24, 20)), percentiles=None)
    with pytest.raises(InputError, match="unknown config key data.synthetic.patch"):
        modality_pair_source({"patch": 3}, pre)
    with pytest.raises(InputError, match="set data.shape"):
        modality_pair_source({}, Preprocessor(NetworkGrid(None), percentiles=None))
    with pytest.raises(InputError, match="S99"):
        modality_pair_source({"folder": str(lpba), "subjects": ["S99"]}, pre)
    train, val = modality_pair_source(
        {"folder": str(lpba), "subjects": ["S11"], "val_subjects": ["S35"], "length": 3}, pre
    )
    assert len(train) == 3 and len(val) == 1 and train.grid.shape == (20, 24, 20)
    item = train[0]
    assert item["target"].shape == (2, 20, 24, 20)
    brain = item["target"][:1] > 0.5  # atlas T1 vs atlas T2-like tissue (no partial volume)
    corr = torch.corrcoef(torch.stack([item["target"][:1][brain], item["fixed"][brain]]))[0, 1]
    assert corr < -0.5
