"""``import cupybn`` needs NumPy only: CuPy is looked for only when CuPy arrays
are passed, and nothing else outside the standard library is imported.

Each check runs in a fresh interpreter, so modules the test session has already
imported (hypothesis, pytest, ml_dtypes, torch, ...) do not hide a dependency.
"""
import subprocess
import sys

SMOKE = """
import numpy as np
import cupybn
x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
y, saved = cupybn.batch_norm(x)
dx, _, _ = cupybn.batch_norm_backward(y, saved)
bn = cupybn.BatchNorm(3)
bn(x)
bn.backward(x)
assert np.isfinite(dx).all()
"""


def run_python(code):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_works_when_cupy_cannot_be_imported():
    # sys.modules["cupy"] = None makes every "import cupy" raise ImportError
    run_python("import sys\nsys.modules['cupy'] = None\n" + SMOKE)


ONLY_NUMPY = """
import importlib.abc, importlib.machinery, sys

attempts = []

class OnlyNumpy(importlib.abc.MetaPathFinder):
    \"\"\"Refuse every installed package but the standard library, numpy and cupybn.

    Optional dependencies count even where they are not installed (a guarded
    "try: import cupy" is still an attempt); other names that are not installed
    (the standard library probes a few, e.g. "org" for Jython) fail as usual.
    \"\"\"

    optional = {"cupy", "cupy_backends", "cupyx", "ml_dtypes", "torch", "hypothesis", "scipy", "mpi4py"}

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in sys.stdlib_module_names or top in ("numpy", "cupybn") or top.startswith("_"):
            return None
        if top not in self.optional and path is None and importlib.machinery.PathFinder.find_spec(name) is None:
            return None
        attempts.append(name)
        raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, OnlyNumpy())
"""


def test_import_needs_nothing_but_numpy_and_the_standard_library():
    out = run_python(ONLY_NUMPY + SMOKE + "print(sorted(set(attempts)))\n")
    assert out.strip() == "[]", f"cupybn tried to import {out.strip()}"


def test_cupybn_does_not_import_cupy_for_numpy_arrays():
    out = run_python(SMOKE + "import sys\nprint('cupy' in sys.modules)\n")
    assert out.strip() == "False"
