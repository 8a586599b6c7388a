"""Same numbers as PyTorch (an extra: skipped when torch is not installed).

float64 on both sides, so the comparison is about conventions (biased variance
in the normalisation, unbiased in the running statistics, momentum, the
cumulative average for momentum=None, gradients), not about rounding.
"""
import numpy as np
import pytest

import cupybn
from cupybn.testing.strategies import make_params, make_x

torch = pytest.importorskip("torch", reason="torch is not installed: the PyTorch comparison is optional")


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 7), (2, 3, 4, 5), (2, 3, 2, 3, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_functional_matches_torch(shape, training):
    rng = np.random.default_rng(0)
    x = make_x(shape, np.float64, 3.0, 2.0, rng)
    dy = rng.standard_normal(shape)
    gamma, beta = make_params(3, np.float64, rng)
    rm, rv = rng.normal(0, 1, 3), rng.uniform(0.5, 2, 3)
    running = rm.copy(), rv.copy()
    y, saved = cupybn.batch_norm(x, gamma, beta, running_mean=running[0], running_var=running[1],
                                 training=training, momentum=0.2, eps=1e-3)
    dx, dgamma, dbeta = cupybn.batch_norm_backward(dy, saved)

    xt = torch.tensor(x, requires_grad=True)
    gt, bt = torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
    rmt, rvt = torch.tensor(rm), torch.tensor(rv)
    yt = torch.nn.functional.batch_norm(xt, rmt, rvt, gt, bt, training=training, momentum=0.2, eps=1e-3)
    yt.backward(torch.tensor(dy))
    for ours, theirs in ((y, yt), (dx, xt.grad), (dgamma, gt.grad), (dbeta, bt.grad),
                         (running[0], rmt), (running[1], rvt)):
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_layer_momentum_none_matches_torch():
    rng = np.random.default_rng(1)
    ours = cupybn.BatchNorm(3, momentum=None, dtype=np.float64)
    theirs = torch.nn.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    for k in range(4):
        x = make_x((6, 3, 4), np.float64, k, 1.0 + k, rng)
        ours(x)
        theirs(torch.tensor(x))
    np.testing.assert_allclose(ours.running_mean, theirs.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(ours.running_var, theirs.running_var.numpy(), rtol=1e-12)
    assert ours.num_batches_tracked == int(theirs.num_batches_tracked)
