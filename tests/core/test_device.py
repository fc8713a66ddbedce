"""Device names: validated once, GPUs refused cleanly where there are none."""

from __future__ import annotations

import pytest
import torch

from learnreg.core.device import check_device_name, resolve_device
from learnreg.core.errors import InputError


def test_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("name", ["tpu", "cuda:", "cuda:x", "gpu", ""])
def test_unknown_names_are_refused(name):
    with pytest.raises(InputError, match="expected one of auto, cpu, cuda, cuda:N"):
        check_device_name(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_a_clean_error(name):
    with pytest.raises(InputError, match="CUDA is not available"):
        resolve_device(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_gpu_beyond_the_count_is_refused():
    with pytest.raises(InputError, match="GPU"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
