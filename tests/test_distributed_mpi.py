"""Synchronised BN over real MPI processes: ``mpiexec -n 1, 2, 3 and 4`` run
tests/mpi_ranks.py, which checks fixed splits (uneven, empty and one-value shards)
against single-process BN of the whole batch at the exactness bar, identical bits on
every rank and from run to run, and that bad input on one rank makes every rank
raise.  A run that does not end within TIMEOUT seconds fails (a hung exchange is a
failure, not a wait).  mpi4py and an MPI come with the test extras (pip install
mpi4py mpich); CI fails if these tests skip."""
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT = 300
SCRIPT = Path(__file__).with_name("mpi_ranks.py")


def mpiexec() -> str:
    pytest.importorskip("mpi4py", reason="mpi4py is not installed")
    found = shutil.which("mpiexec", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if found is None:
        pytest.skip("mpi4py is installed but no mpiexec was found")
    return found


def run_ranks(ranks: int, *args: str) -> str:
    """``mpiexec -n ranks python args...``: its output, once it ended with status 0 within TIMEOUT."""
    command = [mpiexec(), "-n", str(ranks), sys.executable, *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as run:
        try:
            output, _ = run.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            output, _ = run.communicate()
            pytest.fail(f"mpiexec -n {ranks} did not finish within {TIMEOUT} s:\n{output}")
    assert run.returncode == 0, output
    return output


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_synchronised_batch_norm_over_mpi_processes(ranks):
    output = run_ranks(ranks, str(SCRIPT))
    # the ranks' lines may interleave in mpiexec's output
    assert sorted(int(r) for r in re.findall(r"RANK (\d+) OK", output)) == list(range(ranks)), output


def test_the_distributed_demo_follows_the_single_process_run(tmp_path):
    output = run_ranks(2, "-m", "cupybn", "demo", "--distributed", "--steps", "300", "--out", str(tmp_path))
    assert "data-parallel over 2 MPI ranks" in output
    assert "within the tolerance" in output, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.csv", "curves.json", "figure.png"]
