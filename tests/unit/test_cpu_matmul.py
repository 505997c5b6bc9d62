"""The float32 CPU matmul formulations compute x @ w.T, for every shape they take."""
import pytest
import torch
import torch.nn.functional as F

from shard.models import cpu_matmul


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 2, 17, 257])
@pytest.mark.parametrize("out_features", [12, 13])
def test_equals_f_linear(threads: int, rows: int, out_features: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_matmul, "_threads", threads)
    torch.manual_seed(0)
    x, w = torch.randn(rows, 40), torch.randn(out_features, 40)
    out = cpu_matmul.float32_matmul(x, w)
    if out is None:  # F.linear's turn: one row that the threads cannot split evenly, one thread, or many rows
        assert rows > 256 or rows == 1 and (threads == 1 or out_features % threads)
        return
    assert out.shape == (rows, out_features)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_one_row_splits_across_the_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_matmul, "_threads", 4)
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: calls.append(a.shape) or real_bmm(a, b))
    cpu_matmul.float32_matmul(torch.randn(1, 8), torch.randn(16, 8))
    assert calls == [torch.Size([4, 4, 8])]
