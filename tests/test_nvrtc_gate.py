"""The NVRTC compile gate (cupybn.testing.nvrtc): it passes clean kernels, fails on warnings and errors,
finds unregistered kernel files, and passes on the real package and test kernels.

NVRTC needs no GPU.  Without the nvidia-cuda-nvrtc-cu12 wheel these tests skip, except under CI
(``CI`` set), where they fail: the gate must run there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cupybn.kernels import KernelSource
from cupybn.testing import nvrtc

REPO_ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("sm_70", "sm_80", "sm_90")

TEMPLATE_KERNEL = r"""
#include "scale.cuh"

template <typename T, int Block>
__global__ void sum_scaled(const T* __restrict__ x, float* out, int n) {
    __shared__ float partial[Block];
    float acc = 0.0f;
    for (int i = threadIdx.x; i < n; i += Block) acc += scaled(static_cast<float>(x[i]));
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (int half = Block / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}
"""
HEADER = "__device__ __forceinline__ float scaled(float v) { return SCALE * v; }\n"
INSTANTIATIONS = ("sum_scaled<float, 256>", "sum_scaled<double, 128>")


@pytest.fixture
def need_nvrtc() -> None:
    try:
        nvrtc.nvrtc()
    except nvrtc.NvrtcUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the NVRTC gate must run in CI: {exc}")
        pytest.skip(str(exc))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def single_kernel_source(tmp_path: Path, body: str) -> KernelSource:
    return KernelSource(write(tmp_path / "kernel.cu", body))


# ----------------------------------------------------------------------- with NVRTC


@pytest.mark.usefixtures("need_nvrtc")
def test_template_instantiations_compile_for_every_arch_and_report_registers(tmp_path: Path) -> None:
    write(tmp_path / "include" / "scale.cuh", HEADER)
    source = KernelSource(
        write(tmp_path / "kernels" / "sum.cu", TEMPLATE_KERNEL),
        name_expressions=INSTANTIATIONS,
        options=("-I../include", "-DSCALE=2.0f", "-std=c++17"),  # -I relative to the source's directory
    )
    results = nvrtc.gate([source], ARCHS)
    nvrtc.raise_for_failures(results)
    assert [result.arch for result in results] == list(ARCHS)
    for result in results:
        assert result.passed and result.binary, result.failure_message()
        assert set(result.lowered_names) == set(INSTANTIATIONS)
        assert sorted(res.kernel for res in result.resources) == sorted(result.lowered_names.values())
        for resources in result.resources:
            assert resources.registers > 0
            assert resources.shared_bytes in (256 * 4, 128 * 4)
            assert resources.spill_stores == resources.spill_loads == 0
        assert "sum_scaled<float, 256>" in nvrtc.describe(result)


@pytest.mark.usefixtures("need_nvrtc")
def test_the_gate_compiles_with_cupys_options_so_float_arithmetic_flushes_subnormals(tmp_path: Path) -> None:
    # CuPy appends -ftz=true to every compile; the gate must compile the same code.
    source = single_kernel_source(tmp_path, 'extern "C" __global__ void k(float* y) { y[0] = y[1] * y[2]; }\n')
    (result,) = nvrtc.gate([source], ("compute_90",))  # a virtual architecture: the result is PTX
    assert result.passed, result.failure_message()
    assert "-ftz=true" in result.options and "--device-as-default-execution-space" in result.options
    assert b"mul.ftz.f32" in result.binary or b"mul.rn.ftz.f32" in result.binary


@pytest.mark.usefixtures("need_nvrtc")
def test_a_source_that_asks_for_ieee_subnormals_fails_the_gate(tmp_path: Path) -> None:
    # CuPy's -ftz=true comes after the source's options and wins; NVRTC warns, and the gate fails.
    source = KernelSource(write(tmp_path / "kernel.cu", 'extern "C" __global__ void k(float* y) { y[0] = 1.0f; }\n'),
                          options=("-ftz=false",))
    (result,) = nvrtc.gate([source], ("sm_90",))
    assert not result.passed and "ftz" in result.failure_message()


@pytest.mark.usefixtures("need_nvrtc")
@pytest.mark.parametrize(
    ("statement", "diagnostic"),
    [
        ("int unused = 3;", "never referenced"),
        ("char narrowed = 300; y[1] = narrowed;", "truncation"),
    ],
    ids=["unused-variable", "narrowing"],
)
def test_a_warning_fails_the_gate(tmp_path: Path, statement: str, diagnostic: str) -> None:
    body = f'extern "C" __global__ void k(float* y) {{ {statement} y[0] = 1.0f; }}\n'
    (result,) = nvrtc.gate([single_kernel_source(tmp_path, body)], ("sm_90",))
    assert result.compiled  # NVRTC itself accepts it: only the gate's warning rule rejects it
    assert not result.passed
    assert any(diagnostic in line for line in result.warnings)
    with pytest.raises(nvrtc.GateFailed, match=diagnostic):
        nvrtc.raise_for_failures([result])


@pytest.mark.usefixtures("need_nvrtc")
def test_silencing_all_warnings_fails_the_gate(tmp_path: Path) -> None:
    body = 'extern "C" __global__ void k(float* y) { int unused = 3; y[0] = 1.0f; }\n'
    source = KernelSource(write(tmp_path / "kernel.cu", body), options=("-w",))
    (result,) = nvrtc.gate([source], ("sm_90",))
    assert result.compiled and "never referenced" not in result.log
    assert result.warnings == ("option -w hides warnings from the gate",)


@pytest.mark.usefixtures("need_nvrtc")
def test_an_error_fails_the_gate_with_the_log(tmp_path: Path) -> None:
    body = 'extern "C" __global__ void k(float* y) { y[0] = undefined_thing; }\n'
    results = nvrtc.gate([single_kernel_source(tmp_path, body)], ARCHS)
    assert not any(result.compiled for result in results)
    with pytest.raises(nvrtc.GateFailed) as failure:
        nvrtc.raise_for_failures(results)
    message = str(failure.value)
    assert 'identifier "undefined_thing" is undefined' in message
    assert "kernel.cu" in message and all(arch in message for arch in ARCHS)


@pytest.mark.usefixtures("need_nvrtc")
def test_cuda_fp16_compiles_where_the_cuda_headers_are_installed(tmp_path: Path) -> None:
    if not nvrtc.cuda_include_dirs():
        pytest.skip(f"cuda_fp16.h not installed: {nvrtc.HEADERS_HINT}")
    body = (
        "#include <cuda_fp16.h>\n"
        'extern "C" __global__ void widen(const __half* x, float* y) { y[0] = __half2float(x[0]); }\n'
    )
    nvrtc.raise_for_failures(nvrtc.gate([single_kernel_source(tmp_path, body)], ARCHS))


@pytest.mark.usefixtures("need_nvrtc")
def test_the_package_kernels_build_with_nvrtc_alone_and_no_cuda_header() -> None:
    # CuPy finds cuda_fp16.h (and what it includes) differently from release to
    # release; cupybn's kernels need none of it, and the gate compiles them so.
    from cupybn.kernels import BATCH_NORM_SOURCES

    float16 = BATCH_NORM_SOURCES["float16"]
    assert "-I" not in " ".join(nvrtc.gate_options("sm_90", cuda_headers=False))
    result = nvrtc.compile_kernel_source(float16, "sm_90")
    assert result.compiled, result.log
    assert "#include <cuda" not in float16.path.read_text().split("#else", 1)[1]  # past the host harness's branch


@pytest.mark.usefixtures("need_nvrtc")
def test_the_command_line_reports_unregistered_kernel_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "stray.cu", 'extern "C" __global__ void k() {}\n')
    monkeypatch.setattr(nvrtc, "KERNEL_DIR", tmp_path)
    assert nvrtc.main([]) == 1
    assert f"kernel file {tmp_path / 'stray.cu'} is not registered" in capsys.readouterr().err


@pytest.mark.usefixtures("need_nvrtc")
def test_the_command_line_compiles_a_manifest_and_records_resources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "cuda" / "include" / "scale.cuh", HEADER)
    write(tmp_path / "cuda" / "sum.cu", TEMPLATE_KERNEL)
    manifest = write(
        tmp_path / "cuda" / "manifest.py",
        "from pathlib import Path\n"
        "from cupybn.kernels import KernelSource\n"
        f"SOURCES = (KernelSource(Path('sum.cu'), {INSTANTIATIONS!r}, ('-Iinclude', '-DSCALE=3.0f')),)\n",
    )
    record = tmp_path / "resources.json"
    assert nvrtc.main(["--manifest", str(manifest), "--arch", "sm_80", "--record", str(record)]) == 0
    assert "ok   sm_80" in capsys.readouterr().out
    document = json.loads(record.read_text())
    assert document["nvrtc_version"].startswith("12.")
    # The package's own kernels are recorded too; this manifest's are the ones from sum.cu.
    assert {e["name_expression"] for e in document["entries"] if e["source"].endswith("sum.cu")} == set(INSTANTIATIONS)
    assert all(entry["registers"] > 0 and entry["arch"] == "sm_80" for entry in document["entries"])


@pytest.mark.usefixtures("need_nvrtc")
def test_the_real_gate_passes_on_the_package_and_test_kernels() -> None:
    gate = subprocess.run(
        [sys.executable, "-m", "cupybn.testing.nvrtc", "--tests"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert gate.returncode == 0, gate.stdout + gate.stderr


# ----------------------------------------------------------------------- without NVRTC


def test_unregistered_kernel_files_are_reported(tmp_path: Path) -> None:
    registered = write(tmp_path / "registered.cu", "")
    write(tmp_path / "nested" / "forgotten.cu", "")
    write(tmp_path / "header.cuh", "")  # headers are compiled through the sources that include them
    errors = nvrtc.unregistered_kernel_files(tmp_path, [KernelSource(registered)])
    assert errors == [
        f"kernel file {tmp_path / 'nested' / 'forgotten.cu'} is not registered in cupybn.kernels.PACKAGE_SOURCES"
    ]


def test_the_epilogue_variants_are_registered_as_a_module_of_their_own() -> None:
    # Per dtype: calls without an epilogue compile the `false` variants (with
    # every other kernel), calls with one the `true` variants alone; the gate
    # compiles both, so neither can break unseen.
    from cupybn.kernels import BATCH_NORM_EPILOGUE_SOURCES, BATCH_NORM_SOURCES, EPILOGUE_TEMPLATES, PACKAGE_SOURCES

    assert PACKAGE_SOURCES == (*BATCH_NORM_SOURCES.values(), *BATCH_NORM_EPILOGUE_SOURCES.values())
    for dtype, plain in BATCH_NORM_SOURCES.items():
        fused = BATCH_NORM_EPILOGUE_SOURCES[dtype]
        with_epilogue = [n for n in plain.name_expressions if n.split("<")[0] in EPILOGUE_TEMPLATES]
        assert len(plain.name_expressions) == 21 and len(with_epilogue) == 12
        assert all(n.endswith(", false>") for n in with_epilogue)
        assert fused.name_expressions == tuple(n.replace(", false>", ", true>") for n in with_epilogue)
        assert fused.path == plain.path and fused.options == plain.options


def test_relative_include_options_are_resolved_against_the_source_directory(tmp_path: Path) -> None:
    source = KernelSource(
        tmp_path / "kernels" / "k.cu", options=("-I../inc", "-I", "sub", "--include-path=/abs", "-DX")
    )
    kernels = (tmp_path / "kernels").resolve()
    assert source.compile_options() == (
        f"-I{kernels}",
        f"-I{(tmp_path / 'inc').resolve()}",
        f"-I{kernels / 'sub'}",
        "-I/abs",
        "-DX",
    )


PTXAS_LOG = """\
nvrtc: warning: Architectures prior to '<compute/sm>_75' are deprecated and may be removed in a future release
ptxas info    : 0 bytes gmem
ptxas info    : Function properties for _Z6helperf
ptxas         .     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Compiling entry function 'warning_kernel' for 'sm_70'
ptxas info    : Function properties for warning_kernel
ptxas         .     16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem, 360 bytes cmem[0]
ptxas info    : Compile time = 1.0 ms
"""


def test_the_ptxas_report_is_parsed_per_kernel() -> None:
    assert nvrtc.parse_ptxas_report(PTXAS_LOG) == (
        nvrtc.KernelResources(
            "warning_kernel", registers=255, spill_stores=12, spill_loads=8, shared_bytes=2048, stack_bytes=16
        ),
    )


def test_only_real_warnings_count() -> None:
    warnings, notices = nvrtc.classify_log(PTXAS_LOG)
    assert warnings == () and len(notices) == 1  # a kernel named "warning_..." is not a warning
    warnings, _ = nvrtc.classify_log('k.cu(2): warning #177-D: variable "x" was declared but never referenced\n')
    assert len(warnings) == 1


def test_a_missing_library_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(nvrtc.LIBRARY_ENV, str(tmp_path / "libnvrtc.so.12"))
    with pytest.raises(nvrtc.NvrtcUnavailable, match=nvrtc.LIBRARY_ENV):
        nvrtc.find_library()
    monkeypatch.delenv(nvrtc.LIBRARY_ENV)
    monkeypatch.setattr(nvrtc, "_nvidia_package_dirs", lambda: [])
    with pytest.raises(nvrtc.NvrtcUnavailable, match="pip install nvidia-cuda-nvrtc-cu12"):
        nvrtc.find_library()
