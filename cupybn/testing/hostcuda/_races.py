"""Reports of the race check (``sanitize="race"``): from the executable's lines to
source lines, threads and variables.

The checked executable (``include/hostcuda/racecheck_runtime.cc``) prints one
``hostcuda-race`` line per race and one ``hostcuda-race-access`` line for each of
its two accesses, with raw code addresses, and a ``hostcuda-static-shared`` line
for each static ``__shared__`` variable.  Here they become :class:`Race` objects:
``addr2line`` turns the addresses into the kernel's source lines, and the
variables and the launch's arguments name the memory.
"""
from __future__ import annotations

import dataclasses
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

from ._build import HARNESS_PREFIX

WHY = {
    "warps": "the threads are in different warps of one block, and no __syncthreads() comes between the two "
             "accesses",
    "lanes": "the threads are lanes of one warp, and neither a __syncwarp() naming both lanes nor a "
             "__syncthreads() comes between the two accesses",
    "blocks": "the threads are in different blocks, which nothing orders: a hand-off between blocks needs "
              "__threadfence() and then an atomic write in the first, and an atomic on the same address in "
              "the second",
    "block-scoped": "the threads are in different blocks, and a block-scoped atomic (atomicXxx_block) is atomic "
                    "within its own block only",
}


@dataclasses.dataclass(frozen=True)
class RaceAccess:
    """One of the two accesses of a race."""

    op: str                        # "read" or "write"
    atomic: bool
    block_scoped: bool             # an atomicXxx_block (atomic within its block only)
    block: tuple[int, int, int]    # blockIdx
    thread: tuple[int, int, int]   # threadIdx
    warp: int
    lane: int
    location: str                  # "file.cu:LINE" of the access in the kernel source
    stack: tuple[str, ...]         # kernel-source frames, innermost first ("function at file:line")

    def describe(self) -> str:
        kind = ("block-scoped atomic " if self.block_scoped else "atomic " if self.atomic else "") + self.op
        where = "\n      ".join(self.stack) or self.location
        return (f"{kind} by thread {self.thread} of block {self.block} (warp {self.warp}, lane {self.lane})\n"
                f"      {where}")


@dataclasses.dataclass(frozen=True)
class Race:
    """Two unordered accesses to the same byte, at least one a write."""

    memory: str        # "shared" or "global"
    variable: str      # which array: a static __shared__ name, dynamic shared memory, or a kernel argument
    offset: int        # byte offset in that variable (for an argument: from its data pointer)
    why: str           # "warps", "lanes" or "blocks"
    first: RaceAccess  # the access that happened first in this run
    second: RaceAccess

    @property
    def hazard(self) -> str:
        return {("write", "read"): "read-after-write", ("read", "write"): "write-after-read",
                ("write", "write"): "write-after-write"}[(self.first.op, self.second.op)]

    @property
    def lines(self) -> frozenset[str]:
        """The source locations of the two accesses (which came first depends on the scheduling)."""
        return frozenset((self.first.location, self.second.location))

    def describe(self) -> str:
        return (f"{self.hazard} race on {self.memory} memory: {self.variable}, byte {self.offset}\n"
                f"  first:  {self.first.describe()}\n"
                f"  second: {self.second.describe()}\n"
                f"  not ordered: {WHY[self.why]}")


def _fields(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)


def _triple(text: str) -> tuple[int, int, int]:
    x, y, z = (int(v) for v in text.split(","))
    return x, y, z


class _Symbolizer:
    """Source frames and static variables of one executable (addr2line and nm, run once each)."""

    def __init__(self, exe: Path, pcs: list[int], source_name: str):
        self.frames: dict[int, list[tuple[str, str]]] = {}
        wanted = sorted({pc for pc in pcs if pc})
        if wanted:
            out = _run(["addr2line", "-e", str(exe), "-a", "-f", "-C", "-i", *(hex(pc - 1) for pc in wanted)])
            current: list[tuple[str, str]] | None = None
            lines = out.splitlines()
            i = 0
            while i < len(lines):
                if lines[i].startswith("0x"):
                    current = self.frames.setdefault(int(lines[i], 16) + 1, [])
                    i += 1
                elif current is not None and i + 1 < len(lines):
                    location = re.sub(r" \(discriminator \d+\)$", "", lines[i + 1])
                    path, _, line = location.rpartition(":")
                    if path.endswith("/" + source_name):
                        location = f"{source_name}:{line}"
                    current.append((lines[i], location))
                    i += 2
                else:
                    i += 1

    def kernel_frames(self, pc: int) -> list[tuple[str, str]]:
        """(function, location) of the frames in the kernel's own source (not the harness, not the C++ library)."""
        return [(function, location) for function, location in self.frames.get(pc, []) if _is_kernel_source(location)]


def _is_kernel_source(location: str) -> bool:
    path = location.rsplit(":", 1)[0]
    return not (path.startswith(HARNESS_PREFIX) or path.startswith("/usr/") or path == "??")


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    except OSError:  # no binutils: reports keep raw addresses
        return ""


def _function_name(pretty: str) -> str:
    """``void f(float*, int) [with T = float]`` -> ``f [with T = float]``: the function, without its signature."""
    head, paren, _ = pretty.partition("(")
    if not paren:
        return pretty
    name = head.split()[-1] if head.split() else head
    template = pretty[pretty.rfind(" [with "):] if pretty.endswith("]") and " [with " in pretty else ""
    return name + template


def _static_slots(lines: list[str]) -> list[tuple[int, int, str]]:
    """(offset, size, description) of each static __shared__ slot the executable listed."""
    slots = []
    for line in lines:
        if line.startswith("hostcuda-static-shared "):
            head, _, function = line.partition(" function=")
            fields = _fields(head)
            where = f" in {_function_name(function.strip())}" if function.strip() else ""
            slots.append((int(fields["offset"]), int(fields["size"]), f"__shared__ {fields['name']}{where}"))
    return slots


def parse(report: str, exe: Path, source_name: str,
          describe_global: Callable[[int, int], tuple[str, int]]) -> tuple[Race, ...]:
    """The races in the executable's stderr, one per variable and pair of source locations.

    ``source_name`` is the kernel source's name (the debug information joins it
    to the folder the compiler ran in; reports give it as it was given).
    ``describe_global(blob, offset)`` names the kernel argument behind a byte of
    global memory and gives the offset from that argument's data pointer.
    """
    records: list[tuple[dict[str, str], dict[str, str], dict[str, str]]] = []
    lines = report.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("hostcuda-race ") and i + 2 < len(lines):
            records.append((_fields(line), _fields(lines[i + 1]), _fields(lines[i + 2])))
    pcs = [int(a[k], 16) for _, *accesses in records for a in accesses for k in ("pc", "caller")]
    symbols = _Symbolizer(exe, pcs, source_name)
    slots = _static_slots(lines)

    def access(a: dict[str, str]) -> RaceAccess:
        frames = symbols.kernel_frames(int(a["pc"], 16))
        callers = symbols.kernel_frames(int(a["caller"], 16))
        stack = tuple([f"{function} at {location}" for function, location in frames]
                      + [f"called from {location}" for _, location in callers[:1]])
        # An access inside the harness (an atomic, say) is located by the kernel's call of it.
        location = (frames or callers or [("??", a["pc"])])[0][1]
        return RaceAccess(op=a["op"], atomic=a["atomic"] != "0", block_scoped=a["atomic"] == "2",
                          block=_triple(a["block"]),
                          thread=_triple(a["thread"]), warp=int(a["warp"]), lane=int(a["lane"]),
                          location=location, stack=stack)

    races: dict[tuple, Race] = {}
    for head, first, second in records:
        space, offset = head["space"], int(head["offset"])
        if space == "global":
            variable, offset = describe_global(int(head["index"]), offset)
        elif space == "dynamic-shared":
            variable = "extern __shared__ (dynamic shared memory)"
        else:
            found = [(start, name) for start, size, name in slots if start <= offset < start + size]
            variable, offset = (found[0][1], offset - found[0][0]) if found else ("a static __shared__ array", offset)
        race = Race(memory="global" if space == "global" else "shared", variable=variable, offset=offset,
                    why=head["why"], first=access(first), second=access(second))
        # One race per variable and pair of (location, access): the same two
        # lines met in either order, or at other bytes, are the same race.  The
        # executable's order (by address, then threads) decides which is shown.
        key = (race.variable, frozenset({(race.first.location, race.first.op),
                                         (race.second.location, race.second.op)}))
        races.setdefault(key, race)
    return tuple(races.values())


def summary(kernel: str, races: tuple[Race, ...], total: str) -> str:
    head = (f"race check: {len(races)} race{'s' if len(races) != 1 else ''} in kernel {kernel!r} "
            f"({total} conflicting byte accesses in all)")
    return "\n".join([head] + [f"race {i}: {r.describe()}" for i, r in enumerate(races, 1)])
