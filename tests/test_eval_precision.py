"""bench/eval_precision.py: its float32 pass is the model's plain output, its bfloat16 pass really runs in bfloat16."""
import numpy as np
import torch

from bench.eval_precision import evaluate


def test_float32_pass_is_the_plain_forward_and_bf16_differs(tiny_model):
    torch.manual_seed(0)
    x = torch.rand(7, 1, 28, 28)
    with torch.no_grad():
        want = torch.softmax(tiny_model(x), 1)
    _, fp32 = evaluate(tiny_model, x, None)
    _, bf16 = evaluate(tiny_model, x, torch.bfloat16)
    torch.testing.assert_close(torch.from_numpy(fp32), want)
    assert bf16.dtype == np.float32 and bf16.shape == tuple(want.shape)
    assert not np.array_equal(bf16, want.numpy())  # the conv stages really ran in bfloat16
    torch.testing.assert_close(torch.from_numpy(bf16), want, rtol=0.1, atol=0.1)
