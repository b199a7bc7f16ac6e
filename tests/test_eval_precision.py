"""bench/eval_precision.py: its float32 pass is the model's plain output, its bfloat16 pass runs under autocast."""
import torch

from bench.eval_precision import evaluate


def test_float32_pass_is_the_plain_forward_and_bf16_differs(tiny_model):
    torch.manual_seed(0)
    x = torch.rand(7, 1, 28, 28)
    with torch.no_grad():
        want = tiny_model(x)
    _, fp32 = evaluate(tiny_model, x, None, batch=3)  # batches of 3, 3 and 1 are joined back in order
    _, bf16 = evaluate(tiny_model, x, torch.bfloat16, batch=3)
    torch.testing.assert_close(fp32, want)
    assert bf16.dtype == torch.float32 and bf16.shape == want.shape
    assert not torch.equal(bf16, want)  # autocast really ran in bfloat16
    torch.testing.assert_close(bf16, want, rtol=0.1, atol=0.1)
