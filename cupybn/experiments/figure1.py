"""The paper's MNIST experiment (Ioffe & Szegedy 2015, Figure 1), small enough for a CPU.

Two fully connected networks with three sigmoid hidden layers of 100 units
start from the same weights and see the same minibatches; one normalises every
hidden layer's input with :class:`cupybn.BatchNorm` before the nonlinearity.
We record held-out accuracy (the BN network in inference mode, with its
running statistics) and the 15th, 50th and 85th percentiles of the input to one
sigmoid of the last hidden layer over a fixed held-out batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..layer import BatchNorm
from .common import BatchOrder, check_settings, shard_of, sigmoid, softmax_cross_entropy, sum_over_ranks, to_numpy
from .data import Dataset

HIDDEN = (100, 100, 100)
PERCENTILES = (15, 50, 85)


# ---- the networks ---------------------------------------------------------------
@dataclass
class Network:
    """Fully connected: 3 sigmoid hidden layers, softmax output, optional BN.

    Its arrays belong to ``xp`` (NumPy, or CuPy for the CuPy backend on a GPU)."""

    weights: list
    biases: list
    norms: list = field(default_factory=list)  # one BatchNorm per hidden layer, or empty
    xp: Any = np
    comm: Any = None  # data-parallel over this communicator's ranks, or one process

    @classmethod
    def initial(cls, features: int, rng, with_bn: bool, backend=None, comm=None) -> Network:
        """Small random Gaussian weights (as in the paper) drawn from ``rng``, in
        ``backend``'s array module (NumPy when None); BN layers on ``backend``,
        synchronised over ``comm`` when it is given."""
        xp = np if backend is None else backend.xp
        sizes = (features, *HIDDEN, 10)
        weights = [xp.asarray(rng.normal(0.0, 1.0 / np.sqrt(n_in), (n_in, n_out)).astype(np.float32))
                   for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)]
        biases = [xp.zeros(n, np.float32) for n in sizes[1:]]
        norms = [BatchNorm(n, xp=xp, backend=backend, comm=comm) for n in HIDDEN] if with_bn else []
        return cls(weights, biases, norms, xp, comm)

    def copy_weights_from(self, other: Network) -> None:
        self.weights = [w.copy() for w in other.weights]
        self.biases = [b.copy() for b in other.biases]

    def train(self, mode: bool) -> None:
        for bn in self.norms:
            bn.train(mode)

    def forward(self, x):
        """Logits and, per hidden layer, (input h, sigmoid input u, activation)."""
        cache = []
        h = x
        for k, (w, b) in enumerate(zip(self.weights[:-1], self.biases[:-1], strict=True)):
            u = h @ w + b
            if self.norms:
                u = self.norms[k](u)
            a = sigmoid(u, self.xp)
            cache.append((h, u, a))
            h = a
        return h @ self.weights[-1] + self.biases[-1], cache

    def sgd_step(self, x, labels, lr: float, batch_size: int | None = None) -> float:
        """One SGD step on the mean loss of the batch; with ``comm``, ``x`` is this
        rank's shard of a batch of ``batch_size`` rows and the gradients are summed
        over the ranks, so every rank takes the whole batch's step."""
        xp = self.xp
        logits, cache = self.forward(x)
        loss, g = softmax_cross_entropy(logits, labels, xp)
        if self.comm is not None:
            g *= len(x) / (batch_size or len(x))  # this shard's share of the whole batch's mean
        grads_w = [cache[-1][2].T @ g]
        grads_b = [g.sum(axis=0)]
        grads_bn: list = []
        g = g @ self.weights[-1].T
        for k in range(len(cache) - 1, -1, -1):
            h, _, a = cache[k]
            g = g * a * (1.0 - a)  # through the sigmoid
            if self.norms:
                bn = self.norms[k]
                g = bn.backward(g)
                grads_bn[:0] = [bn.grad_gamma, bn.grad_beta]
            grads_w.insert(0, h.T @ g)
            grads_b.insert(0, g.sum(axis=0))
            g = g @ self.weights[k].T
        if self.comm is not None:
            summed = sum_over_ranks(self.comm, [*grads_w, *grads_b, *grads_bn], xp)
            layers = len(grads_w)
            grads_w, grads_b, grads_bn = summed[:layers], summed[layers:2 * layers], summed[2 * layers:]
        for bn, g_gamma, g_beta in zip(self.norms, grads_bn[::2], grads_bn[1::2], strict=True):
            bn.gamma -= lr * g_gamma
            bn.beta -= lr * g_beta
        for w, b, gw, gb in zip(self.weights, self.biases, grads_w, grads_b, strict=True):
            w -= lr * gw
            b -= lr * gb
        return loss

    def evaluate(self, x, labels, probe):
        """Held-out accuracy and the percentiles of the probed sigmoid input
        (inference mode: BN uses its running statistics)."""
        self.train(False)
        try:
            logits, _ = self.forward(x)
            _, cache = self.forward(probe)
        finally:
            self.train(True)
        accuracy = float((logits.argmax(axis=1) == labels).mean())
        return accuracy, np.percentile(to_numpy(cache[-1][1][:, 0]), PERCENTILES)


@dataclass
class Curves:
    steps: list = field(default_factory=list)
    accuracy: dict = field(default_factory=lambda: {"plain": [], "bn": []})
    percentiles: dict = field(default_factory=lambda: {"plain": [], "bn": []})


def run(data: Dataset, *, steps: int, batch_size: int = 60, lr: float = 0.5, seed: int = 0,
        eval_every: int | None = None, probe_size: int = 256, backend=None, progress=None, comm=None) -> Curves:
    """Train both networks side by side; ``progress(step)`` is called as it goes.

    With ``comm`` every rank calls this with the same settings and trains
    data-parallel: each takes its shard of every batch (``shard_of``), BN is
    synchronised over the ranks and the gradients are summed over them, so the
    networks follow the single-process run of the same global batch.

    ``backend`` runs the BN network's layers (None: the NumPy backend); the
    networks' arrays live in its array module (``backend.xp``), so that the
    CuPy backend on a GPU trains on CuPy arrays.  The weights and batches come
    from ``seed`` alone, whatever the backend."""
    check_settings(data, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    xp = np if backend is None else backend.xp
    rng = np.random.default_rng(seed)
    features = data.x_train.shape[1]
    plain = Network.initial(features, rng, with_bn=False, backend=backend, comm=comm)  # backend: its array module
    bn = Network.initial(features, rng, with_bn=True, backend=backend, comm=comm)
    bn.copy_weights_from(plain)
    x_train, y_train = xp.asarray(data.x_train), xp.asarray(data.y_train)
    x_test, y_test = xp.asarray(data.x_test), xp.asarray(data.y_test)
    probe = x_test[:probe_size]
    eval_every = eval_every or max(1, steps // 100)
    curves = Curves()
    batches = BatchOrder(len(data.x_train), batch_size, rng)
    rows = slice(None) if comm is None else shard_of(batch_size, comm)
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            curves.steps.append(step)
            for name, net in (("plain", plain), ("bn", bn)):
                acc, pct = net.evaluate(x_test, y_test, probe)
                curves.accuracy[name].append(acc)
                curves.percentiles[name].append([float(v) for v in pct])
        if step == steps:
            break
        idx = xp.asarray(batches.next()[rows])  # both networks see the same batches
        x, y = x_train[idx], y_train[idx]
        plain.sgd_step(x, y, lr, batch_size)
        bn.sgd_step(x, y, lr, batch_size)
        if progress is not None:
            progress(step + 1)
    return curves


def steps_to_reach(curves: Curves, name: str, fraction: float = 0.95) -> int:
    """First recorded step at which held-out accuracy reaches ``fraction`` of its final value."""
    acc = curves.accuracy[name]
    goal = fraction * acc[-1]
    return next(s for s, a in zip(curves.steps, acc, strict=True) if a >= goal)

