"""The paper's experiment (python -m cupybn demo): outputs, BN's advantage, clear data errors."""
import csv
import gzip
import json

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the bundled digits data set comes with scikit-learn (the demo extra)")

from cupybn.__main__ import main  # noqa: E402
from cupybn.experiments import data as experiment_data  # noqa: E402
from cupybn.experiments import figure1 as experiment  # noqa: E402

STEPS = 400


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--steps", str(STEPS), "--seed", "3", "--out", str(out)]) == 0
    return out


def test_outputs_exist_and_are_well_formed(demo_run):
    with open(demo_run / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["step"] == "0" and rows[-1]["step"] == str(STEPS)
    assert {"plain_accuracy", "bn_accuracy", "plain_p15", "plain_p50", "plain_p85", "bn_p50"} <= set(rows[0])
    data = json.loads((demo_run / "curves.json").read_text())
    assert data["percentiles"] == [15, 50, 85] and len(data["rows"]) == len(rows)
    for row in data["rows"]:
        assert 0.0 <= row["bn_accuracy"] <= 1.0
        assert row["plain_p15"] <= row["plain_p50"] <= row["plain_p85"]


def test_figure_is_a_png(demo_run):
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib (the demo extra)")
    assert (demo_run / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batch_norm_network_ends_more_accurate(demo_run):
    rows = json.loads((demo_run / "curves.json").read_text())["rows"]
    assert rows[-1]["bn_accuracy"] > rows[-1]["plain_accuracy"]


def test_runs_are_deterministic_for_a_seed():
    data = experiment_data.load_digits(1)
    first = experiment.run(data, steps=50, seed=1)
    second = experiment.run(data, steps=50, seed=1)
    assert first.accuracy == second.accuracy and first.percentiles == second.percentiles


def test_evaluation_uses_running_statistics():
    data = experiment_data.load_digits(0)
    net = experiment.Network.initial(data.x_train.shape[1], np.random.default_rng(0), with_bn=True)
    net.sgd_step(data.x_train[:60], data.y_train[:60], 0.5)
    before = net.evaluate(data.x_test, data.y_test, data.x_test[:64])
    tracked = [bn.num_batches_tracked for bn in net.norms]
    # Shifting a running mean must change what evaluation sees; batch statistics would not notice.
    net.norms[-1].running_mean += 5.0
    after = net.evaluate(data.x_test, data.y_test, data.x_test[:64])
    assert not np.allclose(before[1], after[1])
    assert [bn.num_batches_tracked for bn in net.norms] == tracked  # evaluation updates nothing
    assert all(bn.training for bn in net.norms)  # and hands back a network in training mode


def _write_idx(path, array, ndim):
    header = bytes([0, 0, 0x08, ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _mnist_folder(tmp_path, n=120):
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for part, count in (("train", n), ("t10k", n // 2)):
        _write_idx(tmp_path / f"{part}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)), 3)
        _write_idx(tmp_path / f"{part}-labels-idx1-ubyte", rng.integers(0, 10, count), 1)
    return tmp_path


def test_idx_folder_and_npz_load(tmp_path):
    data = experiment_data.load_mnist(_mnist_folder(tmp_path))
    assert data.x_train.shape == (120, 784) and data.x_test.shape == (60, 784)
    assert data.x_train.dtype == np.float32 and 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    npz = tmp_path / "mnist.npz"
    np.savez(npz, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test, y_test=data.y_test)
    again = experiment_data.load_mnist(npz)
    assert np.array_equal(again.y_test, data.y_test)


@pytest.mark.parametrize("breakage, message", [
    ("missing path", "no such file or folder"),
    ("missing file", "missing t10k-labels-idx1-ubyte"),
    ("truncated file", "header says shape"),
    ("not idx", "not an IDX file"),
    ("npz without key", "lacks y_test"),
    ("not npz", "not a readable .npz"),
])
def test_bad_data_gives_a_clear_error(tmp_path, capsys, breakage, message):
    folder = _mnist_folder(tmp_path / "mnist")
    target = folder
    if breakage == "missing path":
        target = tmp_path / "nowhere"
    elif breakage == "missing file":
        (folder / "t10k-labels-idx1-ubyte").unlink()
    elif breakage == "truncated file":
        path = folder / "t10k-labels-idx1-ubyte"
        path.write_bytes(path.read_bytes()[:-5])
    elif breakage == "not idx":
        (folder / "t10k-labels-idx1-ubyte").write_bytes(b"hello, world")
    elif breakage == "npz without key":
        target = tmp_path / "partial.npz"
        np.savez(target, x_train=np.zeros((2, 4)), y_train=np.zeros(2), x_test=np.zeros((2, 4)))
    elif breakage == "not npz":
        target = tmp_path / "text.npz"
        target.write_text("not a zip")
    with pytest.raises(SystemExit) as stop:  # like argparse's errors: exit status 2 before any training
        main(["demo", "--steps", "5", "--data", str(target), "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
