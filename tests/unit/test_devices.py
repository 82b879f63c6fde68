"""One device rule for options, evaluate, pretrain and load_backbone (anomalygen.devices)."""

import pytest
import torch

from anomalygen.devices import device_problem, resolve_device
from anomalygen.errors import AnomalygenError
from anomalygen.options import Device


def test_auto_and_none_pick_cuda_when_available_else_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected and resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("value", ["quantum", "cuda:99", "", 3, "cpu cpu"])
def test_a_device_this_machine_lacks_is_one_error_naming_the_option(value):
    assert device_problem(value) is not None
    with pytest.raises(AnomalygenError, match=r"^gpu .*: not a device of this machine; use auto or .*\(cpu"):
        resolve_device(value, option="gpu")
    with pytest.raises(Exception, match="cpu"):
        Device().validate(value)


def test_load_backbone_refuses_a_missing_device_before_building():
    from anomalygen.diffusion.backbone import load_backbone

    with pytest.raises(AnomalygenError, match="^device cuda:99: not a device"):
        load_backbone("tiny", device="cuda:99")
