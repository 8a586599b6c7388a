"""Turning CUDA source into a host module: one translation unit, one g++ run, a cache.

The translation unit is the compatibility header, the kernel source (with one
rewrite, below) and generated ``extern "C"`` entry points, one per kernel, that
Python calls through ctypes (or, in sanitizer builds, a ``main`` that serves one
launch read from a file).

The one rewrite: ``__shared__`` declarations become references into the
harness' shared memory (``rewrite_shared``).  Every other construct compiles as
written, or fails to compile.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
import shlex
import subprocess
import tempfile
from pathlib import Path

INCLUDE_DIR = Path(__file__).parent / "include"

# Bump when the generated code changes in a way the header hash cannot see.
_BUILD_FORMAT = "5"

# Debug information names the harness's headers by this prefix, not by where the
# package happens to be installed: a cached build made from one checkout is then
# symbolized correctly from any other (the cache key does not hold the path).
HARNESS_PREFIX = "/<hostcuda>"  # absolute, or addr2line joins it to the build folder
_PREFIX_MAP = f"-ffile-prefix-map={INCLUDE_DIR}={HARNESS_PREFIX}"

# "race": GCC's ThreadSanitizer instrumentation with the harness's own runtime in
# place of ThreadSanitizer's (include/hostcuda/racecheck_runtime.cc): a race check with
# CUDA's orderings.  The object is linked without libtsan, and as a position-
# dependent executable so that the addresses it reports are addr2line's.
SANITIZERS = {
    None: [],
    "race": ["-fsanitize=thread", "-Wno-tsan", "-fno-pie", "-DHOSTCUDA_RACECHECK=1",
             # keep memcpy/memset/memmove calls (the runtime checks them) rather than inline copies it cannot see
             "-fno-builtin-memcpy", "-fno-builtin-memset", "-fno-builtin-memmove"],
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
}


class CompileError(RuntimeError):
    """g++ rejected the kernel source (or something the header does not support)."""


@dataclasses.dataclass(frozen=True)
class Build:
    """A compiled module: a shared library, or a sanitizer executable."""

    path: Path
    sanitize: str | None


_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:(?:__align__|alignas)\s*\(\s*\w+\s*\)\s*)?"
    r"(?P<type>[^;\[\]]*?)\s*(?P<name>\b\w+)\s*\[\s*\]\s*;"
)
_SHARED = re.compile(r"(?P<quals>(?:\b(?:volatile|const)\s+)*)(?P<extern>\bextern\s+)?__shared__\b")
_ALIGN = re.compile(r"\b(?:__align__|alignas)\s*\(([^()]*)\)")
_DECLARATOR = re.compile(r"(?P<prefix>.*?)(?P<name>\b[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\[\]]*\]\s*)*)", re.S)


def rewrite_shared(source: str) -> str:
    """Turn ``__shared__`` declarations into references to the harness's shared memory.

    * ``extern __shared__ T name[];`` becomes a pointer to the dynamic shared
      memory buffer.
    * ``__shared__ T a[N], b;`` becomes ``auto& a = ::hostcuda::static_shared<T[N], ...>(...); ...``:
      storage in one arena that the runtime refills for every block and the race
      check knows for shared memory, one slot per declaration and template
      instantiation (a function-local ``static`` cannot be found: GCC ignores
      a section attribute on one in a template).

    Declarations are found with comments blanked out, so a comment that mentions
    ``__shared__`` is left alone, and lines are kept where they were.
    """
    text = _blank_comments(source)
    depth = _brace_depths(text)
    out, last = [], 0
    for m in _SHARED.finditer(text):
        if m.start() < last:
            continue
        line_start = text.rfind("\n", 0, m.start()) + 1
        if text[line_start:m.start()].lstrip().startswith("#"):
            continue  # a macro definition: left alone (and refused by hostcuda.h if used)
        line = text.count("\n", 0, m.start()) + 1
        end = text.find(";", m.end())
        if end < 0:
            raise CompileError(f"line {line}: a __shared__ declaration with no ';'")
        if m.group("extern"):
            ext = _EXTERN_SHARED.fullmatch(text[m.start() + len(m.group("quals")):end + 1].strip())
            if ext is None:
                raise CompileError(f"line {line}: hostcuda supports `extern __shared__ T name[];` only")
            t = (m.group("quals") + ext.group("type")).strip()
            # The buffer is 256-byte aligned, more than any __align__ a kernel asks for.
            replacement = f"{t}* const {ext.group('name')} = reinterpret_cast<{t}*>(::hostcuda::dynamic_smem);"
        else:
            in_function = depth[m.start()] > 0
            replacement = _static_shared(m.group("quals"), text[m.end():end], line, in_function)
        out += [source[last:m.start()], replacement + "\n" * source.count("\n", m.start(), end)]
        last = end + 1
    return "".join(out) + source[last:]


def _static_shared(quals: str, declaration: str, line: int, in_function: bool) -> str:
    align = "0"
    found = _ALIGN.search(declaration)
    if found:
        align = found.group(1).strip()
        declaration = _ALIGN.sub(" ", declaration)
    declarators = _split_top_level(declaration)
    first = _DECLARATOR.fullmatch(declarators[0].strip())
    if first is None or not first.group("prefix").strip():
        raise CompileError(f"line {line}: hostcuda cannot read the __shared__ declaration {declaration.strip()!r}")
    prefix = first.group("prefix").rstrip()
    base = prefix.rstrip("*& \t\n")
    where = "__PRETTY_FUNCTION__" if in_function else '""'
    parts = []
    for i, text in enumerate(declarators):
        d = first if i == 0 else _DECLARATOR.fullmatch(text.strip())
        stars = prefix[len(base):] if i == 0 else (d.group("prefix") if d else "")
        if d is None or stars.strip(" \t\n*") or "&" in stars:
            raise CompileError(f"line {line}: hostcuda cannot read the __shared__ declaration {declaration.strip()!r}")
        element = f"{quals}{base}{stars.replace(' ', '')}".strip()
        dims = re.sub(r"\s+", "", d.group("dims"))
        parts.append(f"auto& {d.group('name')} = ::hostcuda::static_shared<std::type_identity_t<{element}>{dims}, "
                     f"decltype([] {{}}), {align}>(\"{d.group('name')}\", {where});")
    return " ".join(parts)


def _split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside (), [], {} and <>."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def _brace_depths(text: str) -> list[int]:
    """The depth of braces at every position of ``text`` (comments blanked)."""
    depths, depth = [], 0
    for ch in text:
        depths.append(depth)
        depth += {"{": 1, "}": -1}.get(ch, 0)
    return depths


def _blank_comments(source: str) -> str:
    """The source with comments and string literals replaced by spaces (same length)."""
    pattern = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"', re.S)
    return pattern.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), source)


_GLOBAL = re.compile(
    r"__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\("
)


def plain_kernels(source: str) -> list[str]:
    """Names of the ``__global__`` functions that are not templates (templates need name expressions)."""
    text = _blank_comments(source)
    names = []
    for m in _GLOBAL.finditer(text):
        head = text[: m.start()]
        since = max(head.rfind(";"), head.rfind("}"), head.rfind("{"))
        if "template" in head[since + 1 :]:
            continue
        if m.group(1) not in names:
            names.append(m.group(1))
    return names


def _entry_points(kernels: tuple[str, ...]) -> str:
    lines = ["", "// ---- generated by cupybn.testing.hostcuda ----"]
    for i, expr in enumerate(kernels):
        lines += [
            f'extern "C" int hostcuda_launch_{i}(const ::hostcuda::LaunchConfig* c, void** a, char* e, '
            f"std::size_t n) {{ return ::hostcuda::launch(&{expr}, c, a, e, n); }}",
            f'extern "C" const char* hostcuda_signature_{i}() {{ return ::hostcuda::signature(&{expr}); }}',
        ]
    return "\n".join(lines) + "\n"


def _standalone_table(count: int) -> str:
    entries = ", ".join(f"hostcuda_launch_{i}" for i in range(count))
    return (
        "static const ::hostcuda::LaunchFn hostcuda_kernels[] = {" + entries + "};\n"
        f"static const std::size_t hostcuda_kernel_count = {count};\n"
        '#include "hostcuda/standalone_main.h"\n'
    )


# CUDA's __noinline__ cannot be a macro here: libstdc++ spells GCC's attribute
# __attribute__((__noinline__)).  It is rewritten in the kernel source instead.
_NOINLINE = re.compile(r"\b__noinline__\b")


def translation_unit(code: str, kernels: tuple[str, ...], *, standalone: bool, source_name: str) -> str:
    parts = [
        '#include "hostcuda.h"',
        f'#line 1 "{source_name}"',
        _NOINLINE.sub("__attribute__((noinline))", rewrite_shared(code)),
        _entry_points(kernels),
    ]
    if standalone:
        parts.append(_standalone_table(len(kernels)))
    return "\n".join(parts)


# Options that change what the host compiler sees; every other CuPy/NVRTC option
# (-std, --use_fast_math, -arch, -lineinfo, ...) has no host meaning.
_PASSED_PREFIXES = ("-D", "-U", "-I", "--define-macro", "--include-path")


def host_options(options: tuple[str, ...]) -> list[str]:
    """The g++ options for these NVRTC/CuPy options: macros, include folders, and
    flush-to-zero (``-ftz=true``; the last ``-ftz`` given wins, as in NVRTC)."""
    out: list[str] = []
    ftz = False
    it = iter(options)
    for opt in it:
        if opt in ("-D", "-U", "-I"):
            out += [opt, next(it, "")]
        elif opt.startswith("--define-macro="):
            out.append("-D" + opt.split("=", 1)[1])
        elif opt.startswith("--include-path="):
            out.append("-I" + opt.split("=", 1)[1])
        elif opt.startswith(("-D", "-U", "-I")):
            out.append(opt)
        elif opt.startswith(("-ftz=", "--ftz=")):
            value = opt.split("=", 1)[1]
            if value not in ("true", "false"):
                raise CompileError(f"option {opt!r}: NVRTC takes -ftz=true or -ftz=false")
            ftz = value == "true"
    if ftz:
        out.append("-DHOSTCUDA_FTZ=1")
    return out


@functools.cache
def compiler() -> tuple[str, str]:
    """The host compiler and its version line (part of the cache key)."""
    cxx = os.environ.get("CXX", "g++")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise CompileError(f"the host C++ compiler {cxx!r} is not usable ({e}); install g++ >= 12") from e
    return cxx, version.splitlines()[0]


@functools.cache
def _header_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(INCLUDE_DIR.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(INCLUDE_DIR).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def cache_dir() -> Path:
    root = os.environ.get("CUPYBN_HOSTCUDA_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cupybn" / "hostcuda"


def _commands(cxx: str, tu: Path, out: Path, options: list[str], sanitize: str | None) -> list[list[str]]:
    cmd = [cxx, "-std=c++20", "-pthread", "-x", "c++", f"-I{INCLUDE_DIR}", _PREFIX_MAP, "-Wno-unknown-pragmas"]
    if sanitize is None:
        return [cmd + ["-O1", "-fPIC", "-shared"] + options + ["-o", str(out), str(tu)]]
    cmd += ["-O1", "-g"] + SANITIZERS[sanitize] + options
    if sanitize != "race":
        return [cmd + ["-o", str(out), str(tu)]]
    obj = out.with_suffix(".o")  # compiled instrumented, linked with our runtime in place of ThreadSanitizer's
    return [cmd + ["-c", "-o", str(obj), str(tu)],
            [cxx, "-pthread", "-no-pie", "-o", str(out), str(obj), str(_race_runtime())]]


RACE_RUNTIME = INCLUDE_DIR / "hostcuda" / "racecheck_runtime.cc"


def _race_runtime() -> Path:
    """The race check's runtime, compiled once (without instrumentation) and cached."""
    cxx, version = compiler()
    key = hashlib.sha256("\0".join([_BUILD_FORMAT, _header_digest(), version]).encode()).hexdigest()[:32]
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{key}.racecheck.o"
    _compile_into(target, "the race check's runtime",
                  lambda tmp, out: [[cxx, "-std=c++20", "-pthread", "-O2", "-g", "-fno-pie", _PREFIX_MAP,
                                     "-c", "-o", str(out), str(RACE_RUNTIME)]])
    return target


def _compile_into(target: Path, what: str, commands) -> None:
    """Run ``commands(tmp, out)`` in a scratch folder beside ``target`` unless ``target``
    exists, then move ``out`` into place (atomically: concurrent builders agree on one file)."""
    if target.exists():
        return
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        for cmd in commands(Path(tmp), out):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise CompileError(f"host compilation of {what} failed:\n{proc.stderr.strip()}\n"
                                   f"(command: {shlex.join(cmd)})")
        os.replace(out, target)


def build(
    code: str, kernels: tuple[str, ...], options: tuple[str, ...], sanitize: str | None, source_name: str
) -> Build:
    """Compile (or find in the cache) the module for these kernels."""
    if sanitize not in SANITIZERS:
        raise ValueError(f"sanitize must be None, 'race' or 'address', got {sanitize!r}")
    cxx, version = compiler()
    tu_text = translation_unit(code, kernels, standalone=sanitize is not None, source_name=source_name)
    flags = host_options(options)
    key = hashlib.sha256(
        "\0".join([_BUILD_FORMAT, _header_digest(), version, str(sanitize), *flags, tu_text]).encode()
    ).hexdigest()[:32]
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".so" if sanitize is None else f".{sanitize}.exe"
    target = directory / (key + suffix)

    def commands(tmp: Path, out: Path) -> list[list[str]]:
        tu = tmp / "module.cpp"
        tu.write_text(tu_text)
        return _commands(cxx, tu, out, flags, sanitize)

    _compile_into(target, source_name, commands)
    return Build(target, sanitize)
