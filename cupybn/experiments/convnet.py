"""The paper's second result (section 4.2: Figures 2-3, Table 2) on a small
convolutional network: Batch Normalization lets a network train with much
higher learning rates, and with sigmoids.

The paper trained Inception on ImageNet; its claims are about BN, so here they
are tested on a stack of 3x3 convolutions over small images (scikit-learn's
8x8 digits by default), whose BN layers normalise 4-D channels-last
activations.  Every variant starts from the same weights and sees the same
minibatches:

  Baseline           no BN, ReLU, the base learning rate
  BN-Baseline        BN after every convolution, the base rate
  BN-x5, BN-x30      BN, 5 and 30 times the base rate
  Baseline-x5        no BN at 5 times the base rate (what the higher rate does without BN)
  Baseline-Sigmoid   no BN, sigmoids instead of ReLUs, the base rate
  BN-x5-Sigmoid      BN, sigmoids, 5 times the base rate

The base rate is the one a practitioner would pick for the plain network: the
best of a small sweep (``SWEEP``), by its best held-out accuracy, recorded with
the results.  Training is SGD with momentum 0.9 and a cosine learning-rate
schedule over the run, softmax cross-entropy on global-average-pooled features.
Held-out accuracy is measured in inference mode (BN with its running statistics).

Convolutions are im2col followed by one matrix product of the array module, so
the same code runs on NumPy and CuPy arrays.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..layer import BatchNorm
from .common import BatchOrder, check_settings, sigmoid, softmax_cross_entropy
from .data import Dataset

WIDTHS = (16, 16, 16, 16, 16)  # output channels of the 3x3 convolutions
SWEEP = (0.003, 0.01, 0.03, 0.1)  # base learning rates tried on the plain network
MOMENTUM = 0.9
OFFSETS = tuple((i, j) for i in range(3) for j in range(3))


@dataclass(frozen=True)
class Variant:
    name: str
    bn: bool
    activation: str  # "relu" or "sigmoid"
    rate: float  # multiple of the base learning rate


VARIANTS = (
    Variant("Baseline", False, "relu", 1),
    Variant("BN-Baseline", True, "relu", 1),
    Variant("BN-x5", True, "relu", 5),
    Variant("BN-x30", True, "relu", 30),
    Variant("Baseline-x5", False, "relu", 5),
    Variant("Baseline-Sigmoid", False, "sigmoid", 1),
    Variant("BN-x5-Sigmoid", True, "sigmoid", 5),
)


# ---- convolution ------------------------------------------------------------------
def im2col(x, xp):
    """(N, H, W, C) -> (N*H*W, 9*C): each position's 3x3 neighbourhood (zero padding),
    ordered (row offset, column offset, channel).  One strided view and one copy."""
    n, h, w, c = x.shape
    padded = xp.zeros((n, h + 2, w + 2, c), x.dtype)
    padded[:, 1:h + 1, 1:w + 1, :] = x
    sn, sh, sw, sc = padded.strides
    windows = xp.lib.stride_tricks.as_strided(padded, (n, h, w, 3, 3, c), (sn, sh, sw, sh, sw, sc))
    return windows.reshape(n * h * w, 9 * c)


def flipped(weight, c_in: int):
    """The (9*C_out, C_in) weight of the transposed convolution: with zero padding 1 and
    stride 1, the gradient of a 3x3 convolution with respect to its input is the
    convolution of the output gradient with the kernel turned by 180 degrees."""
    c_out = weight.shape[1]
    return weight.reshape(3, 3, c_in, c_out)[::-1, ::-1].transpose(0, 1, 3, 2).reshape(9 * c_out, c_in)


class Conv3x3:
    """3x3 convolution, stride 1, zero padding 1, channels-last; ``bias`` optional
    (a convolution followed by BN has none: BN's beta takes its place)."""

    def __init__(self, weight, bias, xp):
        self.w, self.b, self.xp = weight, bias, xp  # w: (9*C_in, C_out)
        self.dw = self.db = None

    def __call__(self, x):
        self._cols, self._c_in = im2col(x, self.xp), x.shape[-1]
        y = self._cols @ self.w
        if self.b is not None:
            y += self.b
        n, h, w, _ = x.shape
        return y.reshape(n, h, w, -1)

    def backward(self, dy):
        d = dy.reshape(-1, dy.shape[-1])
        self.dw = self._cols.T @ d
        self.db = d.sum(axis=0) if self.b is not None else None
        n, h, w, _ = dy.shape
        return (im2col(dy, self.xp) @ flipped(self.w, self._c_in)).reshape(n, h, w, self._c_in)


# ---- the network ------------------------------------------------------------------
def initial_weights(channels_in: int, classes: int, seed: int, widths=WIDTHS) -> list[np.ndarray]:
    """The weights every variant starts from (NumPy, float64): He-normal convolutions,
    then the classifier (small Gaussian)."""
    rng = np.random.default_rng(seed)
    weights = []
    for c_in, c_out in zip((channels_in, *widths[:-1]), widths, strict=True):
        weights.append(rng.normal(0.0, math.sqrt(2.0 / (9 * c_in)), (9 * c_in, c_out)))
    weights.append(rng.normal(0.0, 1.0 / math.sqrt(widths[-1]), (widths[-1], classes)))
    return weights


class ConvNet:
    """Convolutions (each followed by BN when ``bn``) and ``activation``, global
    average pooling, a linear classifier.  Arrays of ``xp`` in ``dtype``."""

    def __init__(self, weights, variant: Variant, *, xp=np, dtype=np.float32, backend=None):
        self.variant, self.xp, self.dtype = variant, xp, np.dtype(dtype)
        conv_w, head = weights[:-1], weights[-1]
        self.convs = [Conv3x3(xp.asarray(w.astype(dtype)), None if variant.bn else xp.zeros(w.shape[1], dtype), xp)
                      for w in conv_w]
        self.norms = ([BatchNorm(w.shape[1], axis=-1, dtype=dtype, xp=xp, backend=backend) for w in conv_w]
                      if variant.bn else [])
        self.head_w = xp.asarray(head.astype(dtype))
        self.head_b = xp.zeros(head.shape[1], dtype)
        self._velocity: dict[int, Any] = {}

    def train(self, mode: bool) -> None:
        for bn in self.norms:
            bn.train(mode)

    def parameters(self) -> list:
        """Every trained array, each with its gradient after :meth:`backward`: [(param, grad)]."""
        pairs = []
        for k, conv in enumerate(self.convs):
            pairs.append((conv.w, conv.dw))
            if conv.b is not None:
                pairs.append((conv.b, conv.db))
            if self.norms:
                bn = self.norms[k]
                pairs += [(bn.gamma, bn.grad_gamma), (bn.beta, bn.grad_beta)]
        return pairs + [(self.head_w, self._dhead_w), (self.head_b, self._dhead_b)]

    def forward(self, x):
        """Logits for (N, H, W, C) images."""
        self._acts = []
        h = x
        for k, conv in enumerate(self.convs):
            z = conv(h)
            if self.norms:
                z = self.norms[k](z)
            h = sigmoid(z, self.xp) if self.variant.activation == "sigmoid" else self.xp.maximum(z, 0)
            self._acts.append(h)
        self._pooled = h.mean(axis=(1, 2))
        return self._pooled @ self.head_w + self.head_b

    def backward(self, dlogits) -> None:
        """Gradients of every parameter from d(loss)/d(logits)."""
        xp = self.xp
        self._dhead_w = self._pooled.T @ dlogits
        self._dhead_b = dlogits.sum(axis=0)
        h = self._acts[-1]
        _, height, width, _ = h.shape
        g = xp.broadcast_to((dlogits @ self.head_w.T)[:, None, None, :] / (height * width), h.shape)
        for k in range(len(self.convs) - 1, -1, -1):
            a = self._acts[k]
            g = g * (a * (1 - a)) if self.variant.activation == "sigmoid" else g * (a > 0)
            if self.norms:
                g = self.norms[k].backward(xp.ascontiguousarray(g.astype(self.dtype, copy=False)))
            g = self.convs[k].backward(g)

    def sgd_step(self, x, labels, lr: float) -> float:
        """One step of SGD with momentum; returns the loss (NaN or Inf once training has diverged)."""
        loss, dlogits = softmax_cross_entropy(self.forward(x), labels, self.xp)
        self.backward(dlogits)
        for param, grad in self.parameters():
            v = self._velocity.get(id(param))
            v = grad.copy() if v is None else v * MOMENTUM + grad
            self._velocity[id(param)] = v
            param -= lr * v
        return loss

    def accuracy(self, x, labels, batch: int = 500) -> float:
        """Held-out accuracy in inference mode (BN with its running statistics)."""
        self.train(False)
        try:
            hits = 0
            for k in range(0, len(x), batch):
                hits += int((self.forward(x[k:k + batch]).argmax(axis=1) == labels[k:k + batch]).sum())
        finally:
            self.train(True)
        return hits / len(x)


# ---- training ---------------------------------------------------------------------
def cosine_rate(lr: float, step: int, steps: int) -> float:
    """The learning rate of ``step``: ``lr`` decayed to 0 over ``steps`` along a half cosine."""
    return 0.5 * lr * (1.0 + math.cos(math.pi * step / steps))


@dataclass
class Run:
    """One variant's training: held-out accuracy at the recorded steps."""

    variant: Variant
    lr: float
    steps: list = field(default_factory=list)
    accuracy: list = field(default_factory=list)
    diverged_at: int | None = None  # first step whose loss was not finite (training stops there)

    @property
    def best(self) -> float:
        return max(self.accuracy)

    def steps_to(self, goal: float) -> int | None:
        """First recorded step with held-out accuracy >= ``goal`` (None: never)."""
        return next((s for s, a in zip(self.steps, self.accuracy, strict=True) if a >= goal), None)


def train(data: Dataset, variant: Variant, lr: float, *, steps: int, batch_size: int, seed: int,
          eval_every: int, backend=None, progress=None) -> Run:
    """Train one variant from the shared initial weights on the shared batches."""
    xp = np if backend is None else backend.xp
    x_train, y_train = xp.asarray(data.images("train")), xp.asarray(data.y_train)
    x_test, y_test = xp.asarray(data.images("test")), xp.asarray(data.y_test)
    net = ConvNet(initial_weights(x_train.shape[-1], 10, seed), variant, xp=xp, backend=backend)
    batches = BatchOrder(len(data.x_train), batch_size, np.random.default_rng(seed + 1))
    run = Run(variant, lr)
    with np.errstate(over="ignore", invalid="ignore"):  # a diverging variant is a result, not an error
        for step in range(steps + 1):
            if step % eval_every == 0 or step == steps:
                run.steps.append(step)
                run.accuracy.append(net.accuracy(x_test, y_test) if run.diverged_at is None else run.accuracy[-1])
            if step == steps:
                break
            if run.diverged_at is None:
                idx = xp.asarray(batches.next())
                loss = net.sgd_step(x_train[idx], y_train[idx], cosine_rate(lr, step, steps))
                if not math.isfinite(loss):
                    run.diverged_at = step
            if progress is not None:
                progress(step + 1)
    return run


@dataclass
class Results:
    settings: dict
    sweep: dict  # base rate -> the plain network's best held-out accuracy
    base_lr: float
    runs: list  # one Run per variant, in VARIANTS order

    def table(self) -> list[dict]:
        """The paper's Table 2: steps to reach the plain network's best accuracy, and the best accuracy."""
        goal = self.runs[0].best
        return [{"variant": r.variant.name, "lr": r.lr, "steps_to_baseline_best": r.steps_to(goal),
                 "best_accuracy": r.best, "diverged_at": r.diverged_at} for r in self.runs]


def run_all(data: Dataset, *, steps: int = 1500, batch_size: int = 32, seed: int = 0, base_lr: float | None = None,
            eval_every: int | None = None, backend=None, progress=None) -> Results:
    """The sweep (unless ``base_lr`` is given) and every variant; ``progress(done, total)``
    is called with steps done over all runs."""
    check_settings(data, steps=steps, batch_size=batch_size, lr=base_lr if base_lr is not None else SWEEP[0],
                   seed=seed)
    eval_every = eval_every or max(1, steps // 50)
    rates = (base_lr,) if base_lr is not None else SWEEP
    total = steps * (len(rates) + len(VARIANTS) - 1)
    done = 0

    def one(variant, lr):
        nonlocal done
        start = done
        report = None if progress is None else (lambda s: progress(start + s, total))
        r = train(data, variant, lr, steps=steps, batch_size=batch_size, seed=seed, eval_every=eval_every,
                  backend=backend, progress=report)
        done = start + steps
        return r

    baseline = VARIANTS[0]
    sweep_runs = {lr: one(baseline, lr) for lr in rates}
    chosen = max(rates, key=lambda lr: (sweep_runs[lr].best, -rates.index(lr)))  # ties: the smaller rate
    runs = [sweep_runs[chosen]] + [one(v, chosen * v.rate) for v in VARIANTS[1:]]
    settings = {"data": data.name, "steps": steps, "batch_size": batch_size, "seed": seed, "widths": list(WIDTHS),
                "momentum": MOMENTUM, "schedule": "cosine to 0", "eval_every": eval_every,
                "backend": "numpy" if backend is None else getattr(backend, "name", str(backend))}
    return Results(settings, {lr: sweep_runs[lr].best for lr in rates}, chosen, runs)


def curves_of(results: Results) -> dict:
    """Accuracy curves as plain lists (for JSON and CSV)."""
    return {r.variant.name: {"steps": list(r.steps), "accuracy": [float(a) for a in r.accuracy]}
            for r in results.runs}


__all__ = ["VARIANTS", "ConvNet", "Results", "Run", "Variant", "curves_of", "flipped", "im2col", "initial_weights",
           "run_all", "train"]
