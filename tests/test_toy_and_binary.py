"""Paper Figure 3 (toy problem) and a BinaryNet-style block training with AB and STE."""

import pytest
import torch
from torch import nn

import blendq
from blendq.toy import toy_problem


def test_toy_problem_reaches_six_with_alpha_one():
    trace = toy_problem()
    assert len(trace) == 21 and trace[0].w == 2.0 and trace[0].alpha == 0.0
    last = trace[-1]
    assert last.alpha == 1.0
    assert last.wq == 6.0
    assert 5.5 <= last.w < 5.7  # the paper ends at w = 5.506555


def _binary_block():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.Hardtanh(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.Hardtanh(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10, bias=False),
        nn.BatchNorm1d(10),
    )


@pytest.mark.parametrize("method", ["ab", "ste"])
def test_binary_block_trains(method):
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    y = torch.randint(0, 10, (64,))
    model = blendq.prepare(
        _binary_block(),
        blendq.QuantPolicy(
            w_bits=1, a_bits=1, method=method, act_method=method, first_layer=(1, None)
        ),
    )
    schedule = blendq.cubic(0, 30) if method == "ab" else blendq.constant(1.0)
    ctl = blendq.AlphaController(model, schedule)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(60):
        ctl.step(step)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert float(model[0].alpha) == 1.0
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    with blendq.quantized(model) as m:  # the binary network itself has learned
        acc = (m(x).argmax(1) == y).float().mean()
    assert acc > 0.3
