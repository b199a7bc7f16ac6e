"""bench/step_profile.py: the step it times has the run's rows, dtype and updated stages; bench/conv_backward.py's
hand-written weight gradients are the convolution's."""
import pytest
import torch
import torch.nn.functional as F

from bench.conv_backward import weight_grad_as_conv, weight_grad_by_shifts
from bench.step_profile import step_parts
from core.methods import default_config


def test_step_parts_time_the_rows_of_a_k32_step():
    cfg = default_config("structguard", "fashion-mnist", 32, precision="fp32")
    meta = {"config": cfg.to_dict(), "model": {"name": "fmnist_resnet18_narrow",
                                               "card": {"input_shape": [1, 28, 28]}}, "forget_ids": list(range(32))}
    parts = dict(step_parts(meta, repeats=1))
    rows = 32 + cfg.batch_size + cfg.mix_batch  # forget images, proxies, mixtures
    assert list(parts) == [f"forward + backward, {rows} rows (fp32)", "forget check, 32 rows (fp32)",
                           "SR penalty, forward + backward", "SGD update"]
    assert all(ms > 0 for ms in parts.values())
    # the step runs the updated stages on many rows; the check runs them on the forget set only
    assert parts[f"forward + backward, {rows} rows (fp32)"] > parts["forget check, 32 rows (fp32)"]


@pytest.mark.parametrize("hw, stride", [(7, 1), (7, 2), (8, 2), (4, 1)])
def test_hand_written_weight_gradients_match_autograd(hw, stride):
    x = torch.randn(5, 3, hw, hw, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    out = F.conv2d(x, w, None, stride, 1)
    g = torch.randn_like(out)
    (ref,) = torch.autograd.grad(out, w, g)
    torch.testing.assert_close(weight_grad_by_shifts(x, g, stride), ref)
    torch.testing.assert_close(weight_grad_as_conv(x, g, stride), ref)
