"""Where a bfloat16 update step's convolution time goes on this CPU: forward, input gradient and weight gradient of each
3x3 convolution that a k=32 StructGuard step trains (layers 2-4 of the sample model, 288 rows, channels_last), and
two hand-written weight gradients that could replace oneDNN's where it is slow. The engine computes the second one
on output maps of at most 4x4 (core.models.SMALL_MAP: layer4's convolutions), where it measured fastest.

    python bench/conv_backward.py [--out bench/results/conv-backward-intel.md]

Run it with nothing else on the machine: the numbers are wall-clock milliseconds (median of 5 rounds of 20 calls).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROWS = 288  # 32 forget images, 128 proxies, 128 mixtures
SHAPES = ((16, 32, 28, 2), (32, 32, 14, 1), (32, 64, 14, 2), (64, 64, 7, 1), (64, 128, 7, 2), (128, 128, 4, 1))


def ms(fn: Callable[[], object], calls: int = 20, rounds: int = 5) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1000)
    return statistics.median(times)


def weight_grad_by_shifts(x: torch.Tensor, g: torch.Tensor, stride: int) -> torch.Tensor:
    """dL/dW of a 3x3 convolution (padding 1) as one matmul over the nine shifted views of the padded input."""
    n, c = x.shape[:2]
    o, ho, wo = g.shape[1:]
    xp = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)
    cols = torch.cat([xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
                      for i in range(3) for j in range(3)], dim=3).reshape(n * ho * wo, 9 * c)
    return (g.permute(0, 2, 3, 1).reshape(n * ho * wo, o).t() @ cols).view(o, 3, 3, c).permute(0, 3, 1, 2)


def weight_grad_as_conv(x: torch.Tensor, g: torch.Tensor, stride: int) -> torch.Tensor:
    """dL/dW as a forward convolution: the images become channels and the gradient map the kernel (what
    core.models._SmallMapConv computes, with both operands copied to channels_last first)."""
    rows_as_channels = x.transpose(0, 1).contiguous(memory_format=torch.channels_last)
    kernel = g.transpose(0, 1).contiguous(memory_format=torch.channels_last)
    return F.conv2d(rows_as_channels, kernel, None, 1, 1, stride).transpose(0, 1)[:, :, :3, :3]


def measure(cin: int, cout: int, hw: int, stride: int) -> tuple[float, ...]:
    """(forward, input grad, weight grad, by shifts, as a conv) in ms, the two hand-written ones' max relative
    difference from oneDNN's weight gradient, and the error of oneDNN's, of the one as a conv and of the float64
    gradient rounded to bfloat16, each against the float64 gradient of the same bfloat16 operands (mean |error| /
    mean |gradient|): how far each is from the exact sum."""
    x = torch.randn(ROWS, cin, hw, hw, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, 3, 3, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(F.conv2d(x, w, None, stride, 1))

    def backward(mask: list[bool]) -> tuple:
        return torch.ops.aten.convolution_backward(g, x, w, None, [stride] * 2, [1, 1], [1, 1], False, [0, 0], 1, mask)

    ref = backward([False, True, False])[1].float()

    def rel(other: torch.Tensor) -> float:
        return float((other.float() - ref).abs().max() / ref.abs().max())

    exact = torch.ops.aten.convolution_backward(g.double(), x.double(), w.double(), None, [stride] * 2, [1, 1],
                                                [1, 1], False, [0, 0], 1, [False, True, False])[1]

    def error(other: torch.Tensor) -> float:
        return float((other.double() - exact).abs().mean() / exact.abs().mean())

    return (ms(lambda: F.conv2d(x, w, None, stride, 1)), ms(lambda: backward([True, False, False])),
            ms(lambda: backward([False, True, False])), ms(lambda: weight_grad_by_shifts(x, g, stride)),
            ms(lambda: weight_grad_as_conv(x, g, stride)), rel(weight_grad_by_shifts(x, g, stride)),
            rel(weight_grad_as_conv(x, g, stride)), error(backward([False, True, False])[1]),
            error(weight_grad_as_conv(x, g, stride)), error(exact.to(torch.bfloat16)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = ["| conv (in -> out, input map, stride) | forward | input grad | weight grad | weight grad by shifts "
            "(max rel. diff) | weight grad as a conv (max rel. diff) | error: oneDNN / as a conv / exact rounded |",
            "|---|---|---|---|---|---|---|"]
    totals = [0.0, 0.0, 0.0]
    for cin, cout, hw, stride in SHAPES:
        fwd, gx, gw, shifts, as_conv, e_shifts, e_conv, err_dnn, err_conv, err_round = measure(cin, cout, hw, stride)
        for i, v in enumerate((fwd, gx, gw)):
            totals[i] += v
        rows.append(f"| {cin} -> {cout}, {hw}x{hw}, {stride} | {fwd:.2f} | {gx:.2f} | {gw:.2f} | {shifts:.2f} "
                    f"({e_shifts:.0e}) | {as_conv:.2f} ({e_conv:.0e}) "
                    f"| {err_dnn:.6f} / {err_conv:.6f} / {err_round:.6f} |")
    head = (f"Command: `python bench/conv_backward.py{' --out ' + args.out if args.out else ''}`; torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads, bfloat16, channels_last, {ROWS} rows; "
            f"milliseconds per call, median of 5 rounds of 20. Each shape once (a step has 1-3 of each); sums: "
            f"forward {totals[0]:.1f}, input grad {totals[1]:.1f}, weight grad {totals[2]:.1f}.")
    text = "\n".join([head, "", *rows]) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
