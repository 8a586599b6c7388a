"""Saving and restoring a layer: pickle, deepcopy, state dicts (PyTorch's names, Keras's weights)."""
from __future__ import annotations

import copy
import dataclasses
import pickle

import numpy as np
import pytest

import cupybn
from cupybn.backends import NUMPY, NumpyBackend
from cupybn.testing.hostcuda import host_cupy_backend

RNG = np.random.default_rng(2024)
X = (RNG.standard_normal((16, 3, 5, 4)) * 2 + 7).astype(np.float32)
DY = RNG.standard_normal(X.shape).astype(np.float32)
FIELDS = ("gamma", "beta", "running_mean", "running_var", "grad_gamma", "grad_beta")

BACKENDS = {"default": lambda: None, "numpy-1-thread": lambda: NumpyBackend(threads=1),
            "cupy-host": lambda: host_cupy_backend()}


def trained(backend=None, steps=3, **kw):
    bn = cupybn.BatchNorm(3, backend=backend, **kw)
    for i in range(steps):
        bn(X + i)
        bn.backward(DY)
        bn.gamma -= 0.1 * bn.grad_gamma
        bn.beta -= 0.1 * bn.grad_beta
    return bn


def same_bits(a, b) -> bool:
    return a is None and b is None or a.dtype == b.dtype and a.tobytes() == b.tobytes()


def assert_same_state(a, b):
    for field in FIELDS:
        assert same_bits(getattr(a, field), getattr(b, field)), field
    assert a.num_batches_tracked == b.num_batches_tracked and a.training == b.training


def snapshot(bn):
    return {f: None if getattr(bn, f) is None else getattr(bn, f).copy() for f in FIELDS}, bn.num_batches_tracked


@pytest.mark.parametrize("kind", sorted(BACKENDS))
def test_a_pickled_layer_restores_bit_for_bit_and_trains_on_identically(kind):
    bn = trained(BACKENDS[kind]())
    restored = pickle.loads(pickle.dumps(bn))
    assert_same_state(bn, restored)
    assert repr(restored.backend) == repr(bn.backend)
    for layer in (bn, restored):  # one more step each: the same bits
        layer(X * 2)
        layer.backward(DY)
    assert_same_state(bn, restored)
    bn.eval(), restored.eval()
    assert same_bits(bn(X), restored(X))


def test_a_deep_copy_is_independent_and_shares_the_backend():
    backend = NumpyBackend(threads=1)
    bn = trained(backend)
    twin = copy.deepcopy(bn)
    assert_same_state(bn, twin)
    assert twin.backend is backend and copy.copy(backend) is backend
    twin(X + 100)
    assert not same_bits(bn.running_mean, twin.running_mean)  # the copy's statistics are its own


def test_the_last_forward_pass_is_not_saved_so_backward_needs_a_new_one():
    bn = trained()
    bn(X)
    restored = pickle.loads(pickle.dumps(bn))
    assert len(pickle.dumps(bn)) < X.nbytes  # the input is not in the pickle
    with pytest.raises(RuntimeError, match="needs a forward call first"):
        restored.backward(DY)
    restored(X)
    np.testing.assert_array_equal(restored.backward(DY), bn.backward(DY))


@pytest.mark.parametrize("kind", sorted(BACKENDS))
def test_saved_forward_passes_pickle_and_give_the_same_backward(kind):
    backend = BACKENDS[kind]()
    y, saved = cupybn.batch_norm(X, backend=backend)
    restored = pickle.loads(pickle.dumps(saved))
    for got, want in zip(cupybn.batch_norm_backward(DY, restored), cupybn.batch_norm_backward(DY, saved),
                         strict=True):
        assert same_bits(got, want)


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_saved_forward_pass_has_every_field_and_stays_frozen(kind):
    # batch_norm builds BatchNormSaved without the dataclass's __init__ (for speed)
    _, saved = cupybn.batch_norm(X, backend=BACKENDS[kind]())
    assert set(vars(saved)) == {f.name for f in dataclasses.fields(cupybn.BatchNormSaved)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        saved.eps = 1.0


def test_backends_pickle_as_their_settings_and_the_default_as_the_default():
    assert pickle.loads(pickle.dumps(NUMPY)) is NUMPY
    one = pickle.loads(pickle.dumps(NumpyBackend(threads=1, output_cache_bytes=123)))
    assert one is not NUMPY and one.threads == 1 and repr(one) == repr(NumpyBackend(1, 123))
    routes = pickle.loads(pickle.dumps(NumpyBackend(threads=2, small_values=0, tiny_values=7)))
    assert (routes.small_values, routes.tiny_values) == (0, 7)
    host = host_cupy_backend("address", threads=256, sm_count=3, values_per_thread=5, vector_loads=False)
    again = pickle.loads(pickle.dumps(host))
    assert (again.threads, again.sm_count(), again.values_per_thread, again.vector_loads, again.name) == (
        256, 3, 5, False, "host-address")
    assert again._kernels.sanitize == "address" and again.xp is np
    assert copy.deepcopy(host) is host


def test_state_dict_uses_pytorchs_names_and_gives_copies():
    bn = trained()
    state = bn.state_dict()
    assert list(state) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert state["num_batches_tracked"].dtype == np.int64 and state["num_batches_tracked"].shape == ()
    before = state["running_mean"].copy()
    bn(X + 50)
    np.testing.assert_array_equal(state["running_mean"], before)  # the layer moved on, the dict did not
    assert list(cupybn.BatchNorm(3, affine=False).state_dict()) == ["running_mean", "running_var",
                                                                    "num_batches_tracked"]
    assert cupybn.BatchNorm(3, affine=False, track_running_stats=False).state_dict() == {}


@pytest.mark.parametrize("kind", sorted(BACKENDS))
def test_a_state_dict_round_trip_gives_the_same_layer_bit_for_bit(kind):
    bn = trained(BACKENDS[kind]())
    fresh = cupybn.BatchNorm(3, backend=BACKENDS[kind]())
    assert fresh.load_state_dict(bn.state_dict()) == ([], [])
    for field in ("gamma", "beta", "running_mean", "running_var"):
        assert same_bits(getattr(bn, field), getattr(fresh, field))
    assert fresh.num_batches_tracked == bn.num_batches_tracked == 3
    bn.eval(), fresh.eval()
    assert same_bits(bn(X), fresh(X))
    state = bn.state_dict()
    fresh.load_state_dict(state)
    state["weight"][:] = 0
    assert not np.all(fresh.gamma == 0)  # the layer holds its own copies


def test_a_float64_state_loads_into_a_float32_layer_rounded_once():
    state = trained().state_dict()
    wide = {k: v.astype(np.float64) if k != "num_batches_tracked" else v for k, v in state.items()}
    fresh = cupybn.BatchNorm(3)
    fresh.load_state_dict(wide)
    assert fresh.gamma.dtype == np.float32 and same_bits(fresh.gamma, state["weight"])


BAD_STATES = {
    "missing": (lambda s: s.pop("running_var"), KeyError, "missing \\['running_var'\\]"),
    "unexpected": (lambda s: s.update(running_std=s["running_var"]), KeyError, "unexpected \\['running_std'\\]"),
    "shape": (lambda s: s.update(weight=np.ones(4, np.float32)), ValueError, "weight must have shape \\(3,\\)"),
    "integer-dtype": (lambda s: s.update(bias=np.zeros(3, np.int32)), TypeError, "bias must be a floating"),
    "negative-count": (lambda s: s.update(num_batches_tracked=np.int64(-1)), ValueError, "num_batches_tracked"),
    "float-count": (lambda s: s.update(num_batches_tracked=np.float64(2)), ValueError, "num_batches_tracked"),
    "not-an-array": (lambda s: s.update(running_mean=object()), TypeError, "running_mean must be a floating"),
}


@pytest.mark.parametrize("bad", sorted(BAD_STATES))
def test_a_bad_state_is_named_and_changes_nothing(bad):
    spoil, error, message = BAD_STATES[bad]
    bn = trained()
    state = trained(steps=5).state_dict()  # another layer's: loading it would change everything
    spoil(state)
    before = snapshot(bn)
    with pytest.raises(error, match=message):
        bn.load_state_dict(state)
    after = snapshot(bn)
    assert before[1] == after[1] and all(same_bits(before[0][f], after[0][f]) for f in FIELDS)


def test_a_state_without_a_batch_count_keeps_the_layers_and_non_strict_loads_report_names():
    bn = trained()
    state = trained(steps=5).state_dict()
    del state["num_batches_tracked"]
    bn.load_state_dict(state)
    assert bn.num_batches_tracked == 3 and same_bits(bn.gamma, state["weight"])
    state["extra"] = np.zeros(3)
    del state["bias"]
    assert bn.load_state_dict(state, strict=False) == (["bias"], ["extra"])
    with pytest.raises(TypeError, match="mapping"):
        bn.load_state_dict([1, 2])


def test_a_pytorch_batchnorm_state_dict_loads_as_it_is_and_gives_pytorchs_outputs():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    reference = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 2)
        reference.bias.uniform_(-1, 1)
    for i in range(3):
        reference(torch.from_numpy(X + i))
    reference.eval()
    bn = cupybn.BatchNorm(3)
    bn.load_state_dict(reference.state_dict())
    bn.eval()
    assert bn.num_batches_tracked == 3
    np.testing.assert_allclose(bn(X), reference(torch.from_numpy(X)).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_keras_weights_become_a_state_dict():
    gamma, beta, mean, var = (np.full(3, v, np.float32) for v in (2.0, 0.5, 1.0, 4.0))
    state = cupybn.keras_state_dict([gamma, beta, mean, var])
    assert list(state) == ["weight", "bias", "running_mean", "running_var"]
    bn = cupybn.BatchNorm(3, eps=1e-3)
    bn.load_state_dict(state)  # no batch count in Keras: the layer keeps its own
    bn.eval()
    expected = 2.0 * (X.astype(np.float64) - 1.0) / np.sqrt(4.0 + 1e-3) + 0.5  # float64 under any NumPy
    np.testing.assert_allclose(bn(X), expected, rtol=1e-6, atol=1e-5)
    unbiased = cupybn.keras_state_dict([mean, var], center=False, scale=False, batch_size=5)
    np.testing.assert_allclose(unbiased["running_var"], 4.0 * 5 / 4)
    with pytest.raises(ValueError, match="weights must be 4 arrays"):
        cupybn.keras_state_dict([gamma, mean, var])
    with pytest.raises(ValueError, match="batch_size"):
        cupybn.keras_state_dict([mean, var], center=False, scale=False, batch_size=1)


def test_parameters_gradients_and_resets_by_name():
    bn = trained()
    assert set(bn.parameters()) == set(bn.gradients()) == {"gamma", "beta"}
    assert bn.parameters()["gamma"] is bn.gamma and bn.gradients()["beta"] is bn.grad_beta
    first = bn.grad_gamma.copy()
    bn(X)
    bn.backward(DY)
    bn.backward(DY)  # gradients are replaced by each backward call, not added up
    np.testing.assert_array_equal(bn.grad_gamma, cupybn.batch_norm_backward(DY, bn._saved)[1])
    assert not np.array_equal(first, bn.grad_gamma)
    bn.zero_grad()
    assert bn.gradients() == {"gamma": None, "beta": None}
    gamma = bn.gamma
    bn.reset_parameters()
    assert bn.gamma is gamma  # in place: references held elsewhere (an optimiser's) stay valid
    np.testing.assert_array_equal(bn.gamma, 1)
    np.testing.assert_array_equal(bn.beta, 0)
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    assert bn.num_batches_tracked == 0
    assert cupybn.BatchNorm(3, affine=False).parameters() == {}


def test_to_moves_the_arrays_and_chooses_the_backend_again():
    bn = trained(host_cupy_backend())
    bn(X)
    before = snapshot(bn)
    assert bn.to(np) is bn
    assert bn.backend is None and bn._saved is None
    assert all(same_bits(before[0][f], getattr(bn, f)) for f in FIELDS)
    with pytest.raises(TypeError, match="gamma: cannot read"):
        cupybn.BatchNorm(3).to(type("NoModule", (), {"ndarray": type(None), "__name__": "fake",
                                                     "asarray": staticmethod(lambda a: 1 / 0)})())
