"""Every error the recurrent families' public API raises, one row each (the README's error table):
the call, the exception, its message; where the call replaces torch's, torch's own call raises the
same exception type with a message matching the same pattern.
"""
from __future__ import annotations

import pytest
import torch

import seqgen_fast
from seqgen_fast import functional as F
from seqgen_fast._backend import BackendError
from seqgen_fast.nn import GRU, LSTM, GRUCell, LSTMCell
from support.utils import raised

I, H, B, T = 3, 4, 2, 5


def lstm(**kw):
    torch.manual_seed(0)
    return LSTM.from_torch(torch.nn.LSTM(I, H, **kw)), torch.nn.LSTM(I, H, **kw)


def gru(**kw):
    torch.manual_seed(0)
    return GRU.from_torch(torch.nn.GRU(I, H, **kw)), torch.nn.GRU(I, H, **kw)


def cell(kind):
    torch.manual_seed(0)
    theirs = (torch.nn.LSTMCell if kind == "lstm" else torch.nn.GRUCell)(I, H)
    return (LSTMCell if kind == "lstm" else GRUCell).from_torch(theirs), theirs


def x(*shape):
    return torch.randn(*shape)


W_LSTM = [torch.randn(4 * H, I), torch.randn(4 * H, H), torch.randn(4 * H), torch.randn(4 * H)]
W_GRU = [torch.randn(3 * H, I), torch.randn(3 * H, H), torch.randn(3 * H), torch.randn(3 * H)]
# two layers: dropout applies between them
W2_LSTM = W_LSTM + [torch.randn(4 * H, H), torch.randn(4 * H, H), torch.randn(4 * H), torch.randn(4 * H)]
W2_GRU = W_GRU + [torch.randn(3 * H, H), torch.randn(3 * H, H), torch.randn(3 * H), torch.randn(3 * H)]


def functional_dropout(kind):
    """(ours, torch's _VF) two-layer functional calls in training, taking the dropout probability."""
    inp, h0 = x(T, B, I), torch.zeros(2, B, H)
    if kind == "lstm":
        return (lambda p: F.lstm(inp, None, W2_LSTM, num_layers=2, dropout=p, training=True),
                lambda p: torch._VF.lstm(inp, (h0, h0), W2_LSTM, True, 2, p, True, False, False))
    return (lambda p: F.gru(inp, None, W2_GRU, num_layers=2, dropout=p, training=True),
            lambda p: torch._VF.gru(inp, h0, W2_GRU, True, 2, p, True, False, False))


_DROPOUT_RANGE = r"dropout should be a number in range \[0, 1\] representing the probability of an element being zeroed"

# (row id, the (ours, torch's) pair it calls, the call on either, exception, message pattern)
ROWS = [
    ("LSTM input 1-D", lstm, lambda m: m(x(I)), ValueError, r"LSTM: Expected input to be 2D or 3D, got 1D instead"),
    ("LSTM input_size mismatch", lstm, lambda m: m(x(T, B, I + 2)), RuntimeError,
     r"input.size\(-1\) must be equal to input_size. Expected 3, got 5"),
    ("LSTM h0 of another batch", lstm, lambda m: m(x(T, B, I), (x(1, B + 1, H), x(1, B, H))), RuntimeError,
     r"Expected hidden\[0\] size \(1, 2, 4\), got \[1, 3, 4\]"),
    ("LSTM c0 of another size", lstm, lambda m: m(x(T, B, I), (x(1, B, H), x(1, B, H + 1))), RuntimeError,
     r"Expected hidden\[1\] size \(1, 2, 4\), got \[1, 2, 5\]"),
    ("LSTM sequence length 0", lstm, lambda m: m(x(0, B, I)), RuntimeError,
     r"Expected sequence length to be larger than 0 in RNN"),
    ("GRU input 4-D", gru, lambda m: m(x(T, B, I, 1)), ValueError,
     r"GRU: Expected input to be 2D or 3D, got 4D instead"),
    ("GRU input_size mismatch", gru, lambda m: m(x(T, B, I + 2)), RuntimeError,
     r"input.size\(-1\) must be equal to input_size. Expected 3, got 5"),
    ("GRU h0 of another batch", gru, lambda m: m(x(T, B, I), x(1, B + 1, H)), RuntimeError,
     r"Expected hidden size \(1, 2, 4\), got \[1, 3, 4\]"),
    ("GRU sequence length 0", gru, lambda m: m(x(0, B, I)), RuntimeError,
     r"Expected sequence length to be larger than 0 in RNN"),
    ("LSTMCell input 3-D", lambda: cell("lstm"), lambda m: m(x(B, I, 1)), ValueError,
     r"LSTMCell: Expected input to be 1D or 2D, got 3D instead"),
    ("LSTMCell hx 3-D", lambda: cell("lstm"), lambda m: m(x(B, I), (x(1, B, H), x(1, B, H))), ValueError,
     r"LSTMCell: Expected hx\[0\] to be 1D or 2D, got 3D instead"),
    ("GRUCell input 3-D", lambda: cell("gru"), lambda m: m(x(B, I, 1)), ValueError,
     r"GRUCell: Expected input to be 1D or 2D, got 3D instead"),
    ("GRUCell hx 3-D", lambda: cell("gru"), lambda m: m(x(B, I), x(1, B, H)), ValueError,
     r"GRUCell: Expected hidden to be 1D or 2D, got 3D instead"),
    ("LSTM dropout -0.1", lambda: (LSTM, torch.nn.LSTM), lambda cls: cls(I, H, 2, dropout=-0.1), ValueError,
     _DROPOUT_RANGE),
    ("LSTM dropout 1.5", lambda: (LSTM, torch.nn.LSTM), lambda cls: cls(I, H, 2, dropout=1.5), ValueError,
     _DROPOUT_RANGE),
    ("LSTM dropout True", lambda: (LSTM, torch.nn.LSTM), lambda cls: cls(I, H, 2, dropout=True), ValueError,
     _DROPOUT_RANGE),
    ("GRU dropout NaN", lambda: (GRU, torch.nn.GRU), lambda cls: cls(I, H, 2, dropout=float("nan")), ValueError,
     _DROPOUT_RANGE),
    ("GRU dropout 'a'", lambda: (GRU, torch.nn.GRU), lambda cls: cls(I, H, 2, dropout="a"), ValueError,
     r"could not convert string to float: 'a'"),
    ("lstm dropout 1.5 in training", lambda: functional_dropout("lstm"), lambda f: f(1.5), RuntimeError,
     r"dropout probability has to be between 0 and 1, but got 1.5"),
    ("lstm dropout -0.1 in training", lambda: functional_dropout("lstm"), lambda f: f(-0.1), RuntimeError,
     r"dropout probability has to be between 0 and 1, but got -0.1"),
    ("gru dropout NaN in training", lambda: functional_dropout("gru"), lambda f: f(float("nan")), RuntimeError,
     r"dropout probability has to be between 0 and 1, but got nan"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_module_errors_match_torch(row):
    _, pair, call, exc, pattern = row
    for m in pair():
        with pytest.raises(exc, match=pattern):
            call(m)


def test_gru_proj_size_as_torch():
    for cls in (GRU, torch.nn.GRU):
        with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM, not RNN or GRU"):
            cls(I, H, proj_size=2)


@pytest.mark.parametrize("cls,theirs", [(LSTM, torch.nn.GRU), (GRU, torch.nn.LSTM), (LSTMCell, torch.nn.GRUCell),
                                        (GRUCell, torch.nn.LSTMCell)])
def test_from_torch_needs_its_own_class(cls, theirs):
    with pytest.raises(TypeError, match=rf"{cls.__name__}.from_torch: expected a torch.nn.{cls.__name__}, got"):
        cls.from_torch(theirs(I, H))


# functional-only rows: (row id, call, exception, message pattern)
FUNCTIONAL_ROWS = [
    ("lstm input not a tensor", lambda: F.lstm([1.0], None, W_LSTM), TypeError, r"lstm: input must be a Tensor"),
    ("lstm weights per layer", lambda: F.lstm(x(T, B, I), None, W_LSTM[:3]), ValueError,
     r"lstm: expected 4 \(or 5 with projections\) weights per layer and direction with bias=True, got 3"),
    ("lstm_cell input 3-D", lambda: F.lstm_cell(x(B, I, 1), None, *W_LSTM), ValueError,
     r"lstm_cell: input must be a 2-D tensor \[batch, input_size\], got 3-D"),
    ("lstm_cell w_hh shape", lambda: F.lstm_cell(x(B, I), None, W_LSTM[0], x(4 * H, H + 1), *W_LSTM[2:]), ValueError,
     r"lstm_cell: w_hh must have shape \(4\*hidden_size, hidden_size\)"),
    ("lstm_cell w_ih shape", lambda: F.lstm_cell(x(B, I), None, x(3 * H, I), *W_LSTM[1:]), ValueError,
     r"lstm_cell: w_ih must have shape \(4\*hidden_size, input_size\)"),
    ("lstm_cell input_size", lambda: F.lstm_cell(x(B, I + 1), None, *W_LSTM), RuntimeError,
     r"lstm_cell: input has inconsistent input_size: got 4 expected 3"),
    ("lstm_cell one bias", lambda: F.lstm_cell(x(B, I), None, W_LSTM[0], W_LSTM[1], W_LSTM[2], None), ValueError,
     r"lstm_cell: give both b_ih and b_hh, or neither"),
    ("lstm_cell dtype mismatch", lambda: F.lstm_cell(x(B, I).double(), None, *W_LSTM), ValueError,
     r"lstm_cell: w_ih has dtype torch.float32 but input has dtype torch.float64"),
    ("lstm_cell hx shape", lambda: F.lstm_cell(x(B, I), (x(B, H + 1), x(B, H)), *W_LSTM), RuntimeError,
     r"lstm_cell: hx\[0\] must have shape \(2, 4\), got \(2, 5\)"),
    ("lstm weight count", lambda: F.lstm(x(T, B, I), None, W_LSTM[:3], num_layers=2), ValueError,
     r"lstm: weights has 3 tensors, not a multiple of num_layers \* directions = 2"),
    ("gru input not a tensor", lambda: F.gru([1.0], None, W_GRU), TypeError, r"gru: input must be a Tensor"),
    ("gru weight count", lambda: F.gru(x(T, B, I), None, W_GRU[:3]), ValueError, r"gru: weights has 3 tensors"),
    ("gru_cell x 3-D", lambda: F.gru_cell(x(B, I, 1), None, *W_GRU), ValueError,
     r"gru_cell: x must be a 2-D tensor \[batch, input_size\]"),
    ("gru_cell w_hh shape", lambda: F.gru_cell(x(B, I), None, W_GRU[0], x(3 * H, H + 1), *W_GRU[2:]), ValueError,
     r"gru_cell: w_hh must have shape \(3\*hidden_size, hidden_size\)"),
    ("gru_cell w_ih shape", lambda: F.gru_cell(x(B, I), None, x(4 * H, I), *W_GRU[1:]), ValueError,
     r"gru_cell: w_ih must have shape \(3\*hidden_size, input_size\)"),
    ("gru_cell input_size", lambda: F.gru_cell(x(B, I + 1), None, *W_GRU), RuntimeError,
     r"input has inconsistent input_size: got 4 expected 3"),
    ("gru_cell one bias", lambda: F.gru_cell(x(B, I), None, W_GRU[0], W_GRU[1], W_GRU[2], None), ValueError,
     r"gru_cell: give both b_ih and b_hh, or neither"),
    ("gru_cell h 3-D", lambda: F.gru_cell(x(B, I), x(1, B, H), *W_GRU), ValueError,
     r"gru_cell: h must be a 2-D tensor \[batch, hidden_size\], got 3-D"),
    ("gru_cell h batch", lambda: F.gru_cell(x(B, I), x(B + 1, H), *W_GRU), RuntimeError,
     r"Input batch size 2 doesn't match hidden0 batch size 3"),
    ("gru_cell h size", lambda: F.gru_cell(x(B, I), x(B, H + 1), *W_GRU), RuntimeError,
     r"hidden0 has inconsistent hidden_size: got 5, expected 4"),
]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_functional_dropout_checked_only_where_it_applies(kind):
    """As torch's _VF.lstm/gru: a dropout probability out of [0, 1] raises only where dropout runs
    (training, between layers); in eval mode or with one layer it is never read."""
    inp, w, w2 = x(T, B, I), (W_LSTM if kind == "lstm" else W_GRU), (W2_LSTM if kind == "lstm" else W2_GRU)
    fn = F.lstm if kind == "lstm" else F.gru
    fn(inp, None, w2, num_layers=2, dropout=1.5, training=False)
    fn(inp, None, w, num_layers=1, dropout=-3.0, training=True)


@pytest.mark.parametrize("row", FUNCTIONAL_ROWS, ids=[r[0] for r in FUNCTIONAL_ROWS])
def test_functional_errors(row):
    _, call, exc, pattern = row
    with pytest.raises(exc, match=pattern):
        call()


def test_forced_backend_that_cannot_take_the_inputs():
    ours, _ = lstm()
    with seqgen_fast.use_backend("triton"), pytest.raises(BackendError, match=r"forced backend 'triton' cannot take "
                                                                                r"these inputs: dtype float64"):
        ours.double()(x(T, B, I).double())


def table() -> str:
    """The README's markdown table of :data:`ROWS` and :data:`FUNCTIONAL_ROWS` (the messages our calls raise)."""
    lines = ["| call | exception | message | torch's own call |", "|---|---|---|---|"]
    for name, pair, call, _, _ in ROWS:
        e = raised(lambda: call(pair()[0]))
        lines.append(f"| {name} | `{type(e).__name__}` | {str(e).replace('|', '/')} | raises the same |")
    for name, call, _, _ in FUNCTIONAL_ROWS:
        e = raised(call)
        lines.append(f"| {name} | `{type(e).__name__}` | {str(e).replace('|', '/')} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
