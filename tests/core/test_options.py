"""The one option checker: returns valid values, raises the chosen error with the valid list."""

from __future__ import annotations

import pytest

from learnreg.core.errors import InputError
from learnreg.core.options import check_option


def test_valid_values_are_returned_unchanged():
    assert check_option("kernel", "box", ("box", "gaussian")) == "box"
    assert check_option("ndim", 3, (2, 3)) == 3
    assert check_option("norm", None, (None, "batch")) is None


def test_invalid_value_names_option_valid_values_and_closest_match():
    with pytest.raises(ValueError) as info:
        check_option("similarity", "lnc", ("lncc", "mse"))
    msg = str(info.value)
    assert msg == "similarity must be one of ('lncc', 'mse'), got 'lnc' (did you mean 'lncc'?)"
    with pytest.raises(ValueError, match=r"^ndim must be one of \(2, 3\), got 4$"):
        check_option("ndim", 4, (2, 3))  # no hint for non-strings
    with pytest.raises(ValueError, match=r"got 'zzz'$"):
        check_option("mode", "zzz", ("linear", "nearest"))  # no hint when nothing is close


def test_error_type_is_selectable_for_configs():
    with pytest.raises(InputError, match="config device must be one of"):
        check_option("config device", "tpu", ("auto", "cpu", "cuda"), InputError)
    with pytest.raises(KeyError):
        check_option("x", "a", ["b"], KeyError)


def test_converted_checks_give_the_shared_message():
    """Former hand-written checks now go through check_option (message and hint)."""
    import torch

    from learnreg.data.preprocess import NetworkGrid
    from learnreg.nn.blocks import _norm
    from learnreg.spatial.filters import separable_filter
    from learnreg.spatial.sampling import sample

    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"norm must be one of .*did you mean 'batch'"):
        _norm("bach", 2, 4)
    with pytest.raises(ValueError, match=r"padding must be one of \('zeros', 'replicate'\)"):
        separable_filter(x, [(1.0,), (1.0,)], padding="reflect")
    with pytest.raises(ValueError, match=r"interpolation must be one of .*did you mean 'linear'"):
        sample(x, torch.zeros(1, 4, 4, 2), mode="linaer")
    with pytest.raises(ValueError, match=r"orientation must be one of \('RAS', 'native'\)"):
        NetworkGrid(orientation="LPS")
