"""Atlas interest points: structure centroids and the source's option checks."""

from __future__ import annotations

import pytest
import torch

from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.data.interest_points import interest_point_source, structure_centroids
from learnreg.data.preprocess import NetworkGrid, Preprocessor


def test_structure_centroids_are_world_means_of_each_label() -> None:
    lab = torch.zeros(1, 10, 12, 8, dtype=torch.int64)
    lab[0, 2:4, 3:7, 1:3] = 5
    lab[0, 6, 9, 5] = 9
    grid = Grid((10, 12, 8), spacing=(2.0, 1.0, 3.0), origin=(10.0, -5.0, 0.0))
    values, points = structure_centroids(Image(lab, grid, "lab"))
    assert values == [5, 9]
    want = grid.index_to_world(
        torch.tensor([[2.5, 4.5, 1.5], [6.0, 9.0, 5.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(points, want)
    _, absent = structure_centroids(Image(lab, grid, "lab"), [9, 7])
    assert torch.isnan(absent[1]).all() and torch.isfinite(absent[0]).all()
    with pytest.raises(ValueError, match="nonzero"):
        structure_centroids(Image(lab, grid, "lab"), [0, 5])


@pytest.mark.parametrize(
    "options, match",
    [
        ({"registration": "warp"}, "registration"),
        ({"structures": 21}, "list of label values"),
        ({"landmarks": 3}, "unknown config key"),
    ],
)
def test_bad_options_are_named(options, match) -> None:
    pre = Preprocessor(NetworkGrid((8, 8, 8)), percentiles=None)
    with pytest.raises(InputError, match=match):
        interest_point_source(options, pre)
