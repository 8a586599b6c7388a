"""The command line (python -m cupybn compare / demo): bad arguments refused before any work with
argparse-style errors that name the argument and its range, progress lines in logs, the demo on the
CuPy backend (its kernels run by the host harness), and a figure whose percentile lines differ."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import types

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the bundled digits data set comes with scikit-learn (the demo extra)")

import cupybn.__main__ as cli  # noqa: E402
from cupybn import _demo_cli  # noqa: E402
from cupybn.backends import NUMPY  # noqa: E402
from cupybn.experiments import data as experiment_data  # noqa: E402
from cupybn.experiments import figure1 as experiment  # noqa: E402
from cupybn.testing.hostcuda import host_cupy_backend  # noqa: E402


def refused(args, capsys) -> str:
    """Run ``python -m cupybn args``; it must exit with status 2. Returns stderr."""
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture
def no_training(monkeypatch):
    """Any training is a test failure: the errors must come before it."""
    def run(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(experiment, "run", run)


@pytest.fixture
def cupy_unusable(monkeypatch):
    """The CuPy backend cannot run (whatever this machine has): the demo's GPU probe says so."""
    def unusable():
        raise _demo_cli.BackendUnavailable("CuPy finds no NVIDIA GPU (test)")

    monkeypatch.setattr(_demo_cli, "gpu_backend", unusable)


# ---- arguments checked before any work ---------------------------------------------------

@pytest.mark.parametrize("place", ["a file", "under a file", "an output name taken by a folder",
                                   "a read-only folder"])
def test_an_out_folder_that_cannot_be_written_is_refused_before_training(tmp_path, capsys, no_training, place):
    if place == "a file":
        out = tmp_path / "results"
        out.write_text("in the way")
    elif place == "under a file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "results"
    elif place == "an output name taken by a folder":
        out = tmp_path
        (out / "curves.json").mkdir()
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        out = tmp_path / "locked"
        out.mkdir(mode=0o555)
    before = sorted(tmp_path.rglob("*"))
    err = refused(["demo", "--backend", "numpy", "--out", str(out)], capsys)
    assert f"argument --out: {out}" in err or f"argument --out: {tmp_path / 'file'}" in err
    assert sorted(tmp_path.rglob("*")) == before  # nothing made


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    (["--steps", "1.5"], "argument --steps: expected an integer >= 1"),
    (["--batch-size", "1"], "argument --batch-size: expected an integer >= 2, got '1'"),
    (["--batch-size", "5000"], "argument --batch-size: expected an integer from 2 to 1497"),
    (["--lr", "0"], "argument --lr: expected a finite number > 0, got '0'"),
    (["--lr", "-0.5"], "argument --lr: expected a finite number > 0"),
    (["--lr", "nan"], "argument --lr: expected a finite number > 0"),
    (["--lr", "inf"], "argument --lr: expected a finite number > 0"),
    (["--seed", "-1"], "argument --seed: expected an integer >= 0, got '-1'"),
    (["--backend", "gpu"], "argument --backend: invalid choice"),
])
def test_demo_values_out_of_range_are_refused_saying_the_range(tmp_path, capsys, no_training, args, message):
    err = refused(["demo", "--backend", "numpy", *args, "--out", str(tmp_path)], capsys)
    assert message in err
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("args, message", [
    (["--repeat", "0"], "argument --repeat: expected an integer >= 1, got '0'"),
    (["--shape", "1", "3"], "argument --shape: expected N C ... with at least 2 sizes and at least 2 values "
                            "per channel"),
    (["--shape", "5"], "argument --shape: expected N C ... with at least 2 sizes"),
    (["--shape", "4", "0"], "argument --shape: expected an integer >= 1, got '0'"),
    (["--shape", "4", "x"], "argument --shape: expected an integer >= 1, got 'x'"),
    (["--offset", "inf"], "argument --offset: expected a finite number, got 'inf'"),
    (["--dtype", "float16", "--offset", "1e6"], "argument --offset: expected |offset| <= 32752 for float16"),
])
def test_compare_values_out_of_range_are_refused_saying_the_range(capsys, monkeypatch, args, message):
    monkeypatch.setattr(cli, "_median_ms", None)  # timing anything would fail the test
    monkeypatch.setattr(cli, "textbook", None)
    err = refused(["compare", *args], capsys)
    assert message in err


def test_compare_runs_as_often_as_asked(capsys):
    assert cli.main(["compare", "--shape", "4", "3", "2", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert "x (4, 3, 2) float32 nchw, offset 0; median of 2 runs" in out
    assert "cupybn (numpy)" in out


def test_a_batch_of_one_value_per_channel_is_the_smallest_shape_refused(capsys):
    assert cli.main(["compare", "--shape", "2", "1", "--repeat", "1"]) == 0
    refused(["compare", "--shape", "1", "1", "--repeat", "1"], capsys)


def test_settings_out_of_range_are_refused_by_the_experiment_too():
    data = experiment_data.load_digits(0)
    for settings, name in [({"steps": 0}, "steps"), ({"batch_size": 1}, "batch_size"),
                           ({"batch_size": len(data.x_train) + 1}, "batch_size"), ({"lr": float("nan")}, "lr"),
                           ({"lr": 0.0}, "lr"), ({"seed": -1}, "seed"), ({"steps": True}, "steps")]:
        with pytest.raises(ValueError, match=f"^{name} must be"):
            experiment.run(data, **{"steps": 1, **settings})


# ---- backends ------------------------------------------------------------------------------

def test_backend_cupy_where_it_cannot_run_is_an_error_before_training(tmp_path, capsys, no_training, cupy_unusable):
    err = refused(["demo", "--backend", "cupy", "--out", str(tmp_path)], capsys)
    assert "argument --backend: cupy: CuPy finds no NVIDIA GPU (test)" in err


@pytest.mark.parametrize("cupy, reason", [
    (None, "CuPy is not importable"),
    (types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 0))),
     "no NVIDIA GPU found"),
    (types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1 / 0))),
     "no usable NVIDIA GPU: division by zero"),
], ids=["not installed", "no GPU", "no driver"])
def test_the_gpu_probe_says_why_cupy_cannot_run(monkeypatch, cupy, reason):
    monkeypatch.setitem(sys.modules, "cupy", cupy)  # None: import cupy raises ImportError
    with pytest.raises(_demo_cli.BackendUnavailable, match=re.escape(reason)):
        _demo_cli.gpu_backend()
    assert _demo_cli.choose_backend("auto") is NUMPY


def test_auto_chooses_the_cupy_backend_where_it_runs(monkeypatch):
    gpu = host_cupy_backend()
    monkeypatch.setattr(_demo_cli, "gpu_backend", lambda: gpu)
    assert _demo_cli.choose_backend("auto") is gpu
    assert _demo_cli.choose_backend("cupy") is gpu
    assert _demo_cli.choose_backend("numpy") is NUMPY


def test_auto_falls_back_to_numpy_where_cupy_cannot_run(cupy_unusable):
    assert _demo_cli.choose_backend("auto") is NUMPY


def _counted(calls, name, method):
    def counted(*args, **kwargs):
        calls[name] += 1
        return method(*args, **kwargs)

    return counted


HARNESS_RUN = {"steps": 3, "batch_size": 8, "seed": 4}


@pytest.fixture(scope="module")
def harness_demo(tmp_path_factory):
    """``demo --backend cupy`` with the CuPy backend's kernels run on the host: a short run (the harness
    runs each CUDA thread as an OS thread). Returns stdout, stderr (not a terminal), the folder and the
    backend's calls."""
    out = tmp_path_factory.mktemp("demo-cupy")
    backend = host_cupy_backend()
    calls = {"forward_train": 0, "forward_infer": 0, "backward": 0}
    for name in calls:
        setattr(backend, name, _counted(calls, name, getattr(backend, name)))
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        mp.setattr(_demo_cli, "gpu_backend", lambda: backend)
        status = cli.main(["demo", "--backend", "cupy", "--steps", str(HARNESS_RUN["steps"]), "--batch-size",
                           str(HARNESS_RUN["batch_size"]), "--seed", str(HARNESS_RUN["seed"]), "--out", str(out)])
    assert status == 0, stderr.getvalue()
    return stdout.getvalue(), stderr.getvalue(), out, calls


def test_backend_cupy_trains_the_batch_norm_network_on_the_cupy_backend(harness_demo):
    stdout, _, out, calls = harness_demo
    assert "CuPy backend (host)" in stdout
    steps = HARNESS_RUN["steps"]
    # three BN layers: each step is 3 forward_train and 3 backward calls; each evaluation (steps + 1) runs
    # the held-out set and the probe batch through 3 layers in inference mode
    assert calls == {"forward_train": 3 * steps, "backward": 3 * steps, "forward_infer": 3 * 2 * (steps + 1)}
    assert {p.name for p in out.iterdir()} >= {"curves.csv", "curves.json"}


def test_the_cupy_backend_trains_the_same_networks_as_the_numpy_backend(harness_demo):
    rows = json.loads((harness_demo[2] / "curves.json").read_text())["rows"]
    data = experiment_data.load_digits(HARNESS_RUN["seed"])
    curves = experiment.run(data, **HARNESS_RUN)
    for name in ("plain", "bn"):
        assert [r[f"{name}_accuracy"] for r in rows] == curves.accuracy[name]
        got = [[r[f"{name}_p{p}"] for p in experiment.PERCENTILES] for r in rows]
        np.testing.assert_allclose(got, curves.percentiles[name], rtol=1e-4, atol=1e-5)


def test_help_describes_the_cupy_backend(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "not implemented" not in text and "not written" not in text
    assert "cupy: the CuPy backend on an NVIDIA GPU" in text and "auto (default): cupy where it can run" in text


# ---- progress --------------------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("total, lines", [(1000, 10), (37, 10), (3, 3), (1, 1)])
def test_progress_in_a_log_is_a_few_whole_lines(total, lines):
    log = io.StringIO()
    progress = _demo_cli.Progress(total, log)
    for step in range(1, total + 1):
        progress(step)
    written = log.getvalue()
    assert "\r" not in written and written.endswith("\n")
    assert len(written.splitlines()) == lines
    assert f"step {total}/{total} (100%)" in written.splitlines()[-1]


def test_progress_on_a_terminal_is_one_line_redrawn():
    screen = Terminal()
    progress = _demo_cli.Progress(1000, screen)
    for step in range(1, 1001):
        progress(step)
    written = screen.getvalue()
    assert written.count("\n") == 1 and written.endswith("\n")
    assert written.count("\r") == 101  # 0% .. 100%
    assert "100%  step 1000/1000" in written


def test_the_demo_reports_progress_in_a_log(harness_demo):
    stderr = harness_demo[1]
    lines = [line for line in stderr.splitlines() if "training: step" in line]
    assert len(lines) == HARNESS_RUN["steps"] and "\r" not in stderr


# ---- the figure ----------------------------------------------------------------------------

def test_the_percentile_lines_are_told_apart():
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib (the demo extra)")
    curves = experiment.Curves(steps=[0, 1, 2])
    for name in ("plain", "bn"):
        curves.accuracy[name] = [0.1, 0.5, 0.9]
        curves.percentiles[name] = [[-1.0, 0.0, 1.0], [-1.5, 0.1, 1.2], [-2.0, 0.2, 1.4]]
    fig = _demo_cli.make_figure(curves, "test")
    labels = [f"{p}th percentile" for p in experiment.PERCENTILES]
    panels = fig.axes[1:3]  # (b) without BN, (c) with BN: the same three lines
    for ax in panels:
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == labels
        assert len({line.get_color() for line in lines}) == len(lines)
        assert len({line.get_linestyle() for line in lines}) == len(lines)
    styles = [[(line.get_color(), line.get_linestyle()) for line in ax.get_lines()] for ax in panels]
    assert styles[0] == styles[1]
    legend = panels[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == labels
    assert [(h.get_color(), h.get_linestyle()) for h in legend.legend_handles] == styles[0]
