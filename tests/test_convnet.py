"""The convolutional experiment (python -m cupybn convnet, cupybn/experiments/convnet.py):
its layers' gradients by finite differences, its runs' determinism and use of the
running statistics, the command's outputs, and the claims its short run shows."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the experiment's data need scikit-learn: pip install -e '.[demo]'")

from cupybn import __main__ as cli  # noqa: E402
from cupybn import layer  # noqa: E402
from cupybn.experiments import convnet  # noqa: E402
from cupybn.experiments import data as experiment_data  # noqa: E402
from cupybn.experiments.common import softmax_cross_entropy  # noqa: E402


# ---- gradients -----------------------------------------------------------------------------
def _loss(net, x, labels):
    return softmax_cross_entropy(net.forward(x), labels, np)[0]


@pytest.mark.parametrize("variant", [v for v in convnet.VARIANTS if v.rate == 1 or v.name == "BN-x5-Sigmoid"],
                         ids=lambda v: v.name)
def test_every_parameter_gradient_matches_finite_differences_in_float64(variant):
    rng = np.random.default_rng(0)
    widths = (3, 4)
    x = rng.standard_normal((5, 4, 3, 2))
    labels = rng.integers(0, 10, 5)
    net = convnet.ConvNet(convnet.initial_weights(2, 10, seed=1, widths=widths), variant, dtype=np.float64)
    for bn in net.norms:  # parameters away from their initial ones, so every term counts
        bn.gamma[:] = rng.uniform(0.5, 1.5, bn.gamma.shape)
        bn.beta[:] = rng.uniform(-0.5, 0.5, bn.beta.shape)
    for conv in net.convs:
        if conv.b is not None:
            conv.b[:] = rng.uniform(-0.5, 0.5, conv.b.shape)
    _, dlogits = softmax_cross_entropy(net.forward(x), labels, np)
    net.backward(dlogits)
    step = 1e-6
    for param, grad in net.parameters():
        grad = grad.copy()
        numeric = np.zeros_like(param)
        for idx in np.ndindex(param.shape):
            keep = param[idx]
            param[idx] = keep + step
            up = _loss(net, x, labels)
            param[idx] = keep - step
            down = _loss(net, x, labels)
            param[idx] = keep
            numeric[idx] = (up - down) / (2 * step)
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)


def test_the_convolution_is_a_3x3_zero_padded_correlation_and_its_input_gradient_its_adjoint():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5, 4, 3))
    w = rng.standard_normal((27, 4))
    conv = convnet.Conv3x3(w, None, np)
    y = conv(x)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    kernel = w.reshape(3, 3, 3, 4)
    direct = sum(padded[:, i:i + 5, j:j + 4, :] @ kernel[i, j] for i in range(3) for j in range(3))
    np.testing.assert_allclose(y, direct, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx = conv.backward(dy)
    # <conv(x), dy> = <x, conv^T(dy)> for any x
    other = rng.standard_normal(x.shape)
    assert np.isclose(np.sum(conv(other) * dy), np.sum(other * dx), rtol=1e-12)


# ---- runs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return experiment_data.load_digits(0)


def test_runs_are_deterministic_for_a_seed(digits):
    first = convnet.run_all(digits, steps=12, seed=3, base_lr=0.02, eval_every=4)
    second = convnet.run_all(digits, steps=12, seed=3, base_lr=0.02, eval_every=4)
    assert convnet.curves_of(first) == convnet.curves_of(second)
    assert first.table() == second.table()


def test_held_out_accuracy_uses_the_running_statistics(digits, monkeypatch):
    seen = []
    real = layer.batch_norm

    def spy(*args, **kwargs):
        seen.append((kwargs["training"], kwargs["running_mean"] is not None))
        return real(*args, **kwargs)

    net = convnet.ConvNet(convnet.initial_weights(1, 10, seed=0), convnet.VARIANTS[1])
    monkeypatch.setattr(layer, "batch_norm", spy)
    net.accuracy(digits.images("test")[:50], digits.y_test[:50])
    assert seen and all(s == (False, True) for s in seen)
    assert all(bn.training for bn in net.norms)  # back in training mode afterwards
    seen.clear()
    net.sgd_step(digits.images("train")[:8], digits.y_train[:8], 0.01)
    assert seen and all(s == (True, True) for s in seen)


def test_a_diverging_variant_stops_and_keeps_its_last_accuracy(digits):
    run = convnet.train(digits, convnet.VARIANTS[0], 1e6, steps=20, batch_size=16, seed=0, eval_every=5)
    assert run.diverged_at is not None and run.diverged_at < 20
    after = [a for s, a in zip(run.steps, run.accuracy, strict=True) if s > run.diverged_at]
    assert len(set(after)) <= 1


def test_the_sweep_picks_the_plain_networks_best_rate(digits):
    results = convnet.run_all(digits, steps=30, seed=0, eval_every=10)
    assert set(results.sweep) == set(convnet.SWEEP)
    assert results.sweep[results.base_lr] == max(results.sweep.values())
    assert results.runs[0].lr == results.base_lr
    assert [r.lr for r in results.runs] == [results.base_lr * v.rate for v in convnet.VARIANTS]


def test_the_claims_of_the_default_run_hold_in_a_short_one(digits):
    # 150 steps of each variant at the default run's base rate (0.03, the best of its sweep):
    # with BN at 5x the rate the network reaches the plain network's best accuracy sooner and
    # ends higher; with sigmoids it trains only with BN (without BN it stays at chance, 1 in 10).
    variants = {v.name: v for v in convnet.VARIANTS}
    runs = {name: convnet.train(digits, variants[name], 0.03 * variants[name].rate, steps=150, batch_size=32,
                                seed=0, eval_every=10)
            for name in ("Baseline", "BN-x5", "Baseline-Sigmoid", "BN-x5-Sigmoid")}
    goal = runs["Baseline"].best
    assert runs["BN-x5"].steps_to(goal) < runs["Baseline"].steps_to(goal)
    assert runs["BN-x5"].best > runs["Baseline"].best
    assert runs["Baseline-Sigmoid"].best < 0.2
    assert runs["BN-x5-Sigmoid"].best > 0.5


def test_the_cupy_backend_on_the_host_harness_trains_the_same_bn_network(digits):
    # convnet --backend cupy runs BN through the CuPy backend's kernels; here those kernels run on
    # the host harness (NumPy arrays), so the arrays and the rest of the network are the same
    from cupybn.testing.hostcuda import host_cupy_backend

    variant = convnet.VARIANTS[2]  # BN-x5
    kwargs = {"steps": 2, "batch_size": 8, "seed": 5, "eval_every": 1}
    small = experiment_data.Dataset(digits.x_train[:64], digits.y_train[:64], digits.x_test[:40],
                                    digits.y_test[:40], digits.name, digits.image_shape)
    harness = convnet.train(small, variant, 0.1, backend=host_cupy_backend(), **kwargs)
    numpy = convnet.train(small, variant, 0.1, **kwargs)
    assert harness.steps == numpy.steps == [0, 1, 2]
    assert np.allclose(harness.accuracy, numpy.accuracy, atol=1 / 40 + 1e-9)  # rounding may flip one image


# ---- the command line ----------------------------------------------------------------------
def test_the_command_writes_the_table_csv_json_and_figure(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["convnet", "--steps", "6", "--lr", "0.02", "--batch-size", "16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    names = [v.name for v in convnet.VARIANTS]
    assert all(name in printed for name in names) and "best accuracy" in printed
    with open(out / "curves.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", *names]
    assert [int(r[0]) for r in rows[1:]][-1] == 6
    doc = json.loads((out / "results.json").read_text())
    assert doc["base_lr"] == 0.02 and len(doc["table"]) == len(names)
    assert {"steps_to_baseline_best", "best_accuracy", "lr", "variant", "diverged_at"} <= set(doc["table"][0])
    assert (out / "figure.png").stat().st_size > 10_000


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps: expected an integer >= 1"),
    (["--lr", "-1"], "--lr: expected a finite number > 0"),
    (["--batch-size", "5000"], "--batch-size: expected an integer from 2 to 1497"),
])
def test_bad_arguments_are_errors_before_any_training(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as stop:
        cli.main(["convnet", "--out", str(tmp_path / "o"), *args])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
