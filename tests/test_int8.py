"""mamcli.int8: its products equal their definition bit for bit, rows do not depend on their batch, a quiet row
keeps its bits beside a loud one (where torch.ao's one scale per input loses them), stacking changes nothing; the
shortlist argmax picks float32's best allowed output where int8 alone cannot tell it apart."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from mamcli.int8 import Int8Linear, ShortlistArgmax, quantize_rows, stack_linears


def _linear(inp: int, out: int, bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(inp, out, bias=bias)


def _batch() -> torch.Tensor:
    """Rows of very different loudness, one all zero: what a clip's speech and padding rows look like."""
    torch.manual_seed(1)
    x = torch.randn(2, 5, 24)
    x[0, 1] *= 1000.0
    x[1, 2] *= 1e-3
    x[1, 4] = 0.0
    return x


def test_product_equals_its_definition_bit_for_bit():
    lin = _linear(24, 16)
    layer = Int8Linear.of(lin)
    x = _batch()
    flat = x.reshape(-1, 24)
    s = flat.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
    q = torch.round(flat / s)
    w = lin.weight.detach()
    sw = w.abs().amax(1) / 127
    wq = torch.round(w / sw[:, None])
    assert q.abs().max() <= 127 and wq.abs().max() <= 127
    sums = (q.long() @ wq.long().T).float()  # exact integer sums, as int32 holds them
    ref = (sums * sw * s + lin.bias.detach()).view(2, 5, 16)
    assert torch.equal(layer(x), ref)
    assert torch.equal(layer(x)[1, 4], lin.bias.detach())  # an all-zero row gives the bias, no NaN
    assert torch.equal(layer.dequantized(), wq * sw[:, None])


def test_a_row_does_not_depend_on_its_batch():
    layer = Int8Linear.of(_linear(24, 16))
    x = _batch()
    whole = layer(x)
    for i in range(2):
        for j in range(5):
            assert torch.equal(layer(x[i, j:j + 1]), whole[i, j:j + 1])


def test_quiet_rows_keep_their_bits_beside_a_loud_one():
    lin = _linear(24, 16, bias=False)
    x = _batch()
    quiet = [(0, 0), (0, 2), (1, 0), (1, 2)]
    with torch.no_grad():
        ref = lin(x)
        ours = Int8Linear.of(lin)(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ao = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                                        dtype=torch.qint8)(x)

    def rel(y: torch.Tensor, i: int, j: int) -> float:
        return float((y[i, j] - ref[i, j]).norm() / ref[i, j].norm())

    assert max(rel(ours, i, j) for i, j in quiet) < 0.02
    assert min(rel(ao, i, j) for i, j in quiet) > 0.5  # one scale for the whole input: the quiet rows round to ~0


def test_stacked_layers_equal_each_alone():
    lins = [_linear(24, 16, seed=0), _linear(24, 16, bias=False, seed=1), _linear(24, 8, seed=2)]
    x = _batch()
    parts = Int8Linear.stacked(lins)(x).split([16, 16, 8], dim=-1)
    for lin, part in zip(lins, parts, strict=True):
        assert torch.equal(part, Int8Linear.of(lin)(x))


def test_quantize_rows_rounds_each_row_to_its_own_scale():
    x = torch.tensor([[0.4, -1.0, 0.2], [254.0, 10.0, -3.2], [0.0, 0.0, 0.0]])
    q, s = quantize_rows(x)
    assert torch.equal(q, torch.tensor([[51, -127, 25], [127, 5, -2], [0, 0, 0]], dtype=torch.int8))
    assert torch.equal(s[:2, 0], torch.tensor([1.0, 254.0]) / 127)
    assert s[2, 0] > 0


def test_stack_linears_puts_outputs_side_by_side():
    a, b = _linear(24, 16, seed=2), _linear(24, 8, bias=False, seed=3)
    x = torch.randn(5, 24)
    with torch.no_grad():
        both = stack_linears([a, b])(x)
        assert torch.allclose(both, torch.cat([a(x), b(x)], -1), atol=1e-6)
        assert torch.equal(stack_linears([a, b]).bias[16:], torch.zeros(8))  # a missing bias is zeros


def _near_twins() -> torch.nn.Linear:
    """Outputs 3 and 7 lead and score almost alike: their weights differ only where 3 has 0 and 7 has 1e-4, below
    half an int8 step, so int8 ties them (its argmax takes the first, 3) while 7 wins in float32 for inputs with
    x[0] = 1 (by 1e-4, far above float32's rounding). Output 5 scores highest of all."""
    lin = _linear(24, 12, bias=True, seed=4)
    with torch.no_grad():
        lin.weight[3, 0] = 0.0
        lin.weight[7] = lin.weight[3]
        lin.weight[7, 0] = 1e-4
        lin.bias[[3, 7]] = 20.0
        lin.weight[5] = lin.weight[3]
        lin.bias[5] = 21.0
    return lin


def _inputs(rows: int) -> torch.Tensor:
    torch.manual_seed(5)
    x = torch.randn(rows, 24)
    x[:, 0] = 1.0
    return x


@pytest.mark.parametrize("ranker", ["mamcli.int8", "torch.ao"])
def test_shortlist_argmax_is_float32s_pick_where_int8_ties(ranker):
    lin = _near_twins()
    x = _inputs(4)
    if ranker == "torch.ao":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rank = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                                          dtype=torch.qint8)[0]
    else:
        rank = Int8Linear.of(lin)
    pick = ShortlistArgmax(lin, rank, k=4)
    banned = torch.zeros(12, dtype=torch.bool)
    banned[5] = True  # the best output is not allowed
    with torch.no_grad():
        exact = lin(x).masked_fill(banned, -math.inf).argmax(-1)
        int8_alone = rank(x).masked_fill(banned, -math.inf).argmax(-1)
        ours = pick(x, banned)
    assert exact.tolist() == [7] * 4
    assert int8_alone.tolist() == [3] * 4  # what an int8 projection alone would pick
    assert torch.equal(ours, exact)
    assert torch.equal(pick(x, torch.zeros(12, dtype=torch.bool)), torch.full((4,), 5))


def test_shortlist_never_picks_a_banned_output_when_few_are_allowed():
    lin = _near_twins()
    pick = ShortlistArgmax(lin, Int8Linear.of(lin), k=16)  # k beyond the 12 outputs: all are scored
    banned = torch.ones(12, dtype=torch.bool)
    banned[[0, 9]] = False
    x = _inputs(6)
    with torch.no_grad():
        exact = lin(x).masked_fill(banned, -math.inf).argmax(-1)
        assert torch.equal(pick(x, banned), exact)
    assert set(exact.tolist()) <= {0, 9}
