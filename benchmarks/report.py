"""Markdown summary of a pytest-benchmark JSON file from benchmarks/.

    python benchmarks/report.py bench.json           # print the tables
    python benchmarks/report.py bench.json --save    # also write benchmarks/results/<machine>-<date>.json
    python benchmarks/report.py epi.json --epilogue [--save]   # bench_epilogue.py's run (epilogue-<machine>-<date>)

Times are medians in milliseconds.  ``torch/cupybn`` above 1 means cupybn is
faster.  ``cupybn/copy`` is cupybn's time in units of one ``np.copyto`` of x
(one read plus one write of x), measured in the same run: the memory floor.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from datetime import date
from pathlib import Path

IMPLS = ("cupybn", "textbook", "torch")
OPS = ("forward-train", "inference", "backward")
RESULTS = Path(__file__).resolve().parent / "results"


def load(path: str | Path) -> tuple[dict, dict, dict]:
    """From a --benchmark-json file: (machine description, medians[case][op][impl] in ms, bytes of x per case)."""
    doc = json.loads(Path(path).read_text())
    medians: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    nbytes = {}
    for b in doc["benchmarks"]:
        info = b["extra_info"]
        if "op" not in info:  # bench_gpu.py's, in a run of all benchmarks on a GPU machine: gpu-check reports those
            continue
        if info.get("suite") == "epilogue":  # bench_epilogue.py's: --epilogue reports those
            continue
        medians[info["case"]][info["op"]][info["impl"]] = b["stats"]["median"] * 1e3
        nbytes[info["case"]] = info["nbytes"]
    machine = dict(doc["machine_info"].get("cupybn", {}))
    machine.setdefault("platform", doc["machine_info"].get("platform"))
    return machine, {case: dict(ops) for case, ops in medians.items()}, nbytes


def load_epilogue(path: str | Path) -> tuple[dict, dict]:
    """bench_epilogue.py's medians[case][op][impl] in ms, and the machine."""
    doc = json.loads(Path(path).read_text())
    medians: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for b in doc["benchmarks"]:
        info = b["extra_info"]
        if info.get("suite") == "epilogue":
            medians[info["case"]][info["op"]][info["impl"]] = b["stats"]["median"] * 1e3
    machine = dict(doc["machine_info"].get("cupybn", {}))
    return machine, {case: dict(ops) for case, ops in medians.items()}


def epilogue_markdown(machine: dict, medians: dict) -> str:
    impls = ("fused", "unfused", "torch")
    lines = [f"Machine: {machine.get('cpu_model', '?')}, {machine.get('cores', '?')} cores, "
             f"{machine.get('threads', '?')} threads; numpy {machine.get('numpy', '?')}, "
             f"torch {machine.get('torch') or 'not installed'}; load average at start "
             f"{machine.get('loadavg_at_start', float('nan')):.2f}",
             "",
             "| case | op | fused ms | unfused ms | torch ms | unfused/fused | torch/fused |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for case, ops in medians.items():
        for op, t in ops.items():
            cells = " | ".join(_ms(t.get(impl)) for impl in impls)
            lines.append(f"| {case} | {op} | {cells} | {_ratio(t.get('unfused'), t.get('fused'))} | "
                         f"{_ratio(t.get('torch'), t.get('fused'))} |")
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:#.3g}" if v < 10 else f"{v:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None else f"{a / b:.2f}"


def markdown(machine: dict, medians: dict, nbytes: dict) -> str:
    lines = [
        f"Machine: {machine.get('cpu_model', '?')}, {machine.get('cores', '?')} cores, "
        f"{machine.get('threads', '?')} threads for cupybn/torch; numpy {machine.get('numpy', '?')}, "
        f"torch {machine.get('torch') or 'not installed'}; {machine.get('platform', '?')}; "
        f"load average at start {machine.get('loadavg_at_start', float('nan')):.2f}",
        "",
        "| case | op | cupybn ms | textbook ms | torch ms | torch/cupybn | cupybn/copy |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for case, ops in medians.items():
        copy = ops.get("copy", {}).get("copy")
        rows = [(op, ops.get(op, {})) for op in OPS]
        # a training step runs forward-train then backward
        train, back = ops.get("forward-train", {}), ops.get("backward", {})
        rows.append(("**forward+backward**", {
            impl: train[impl] + back[impl] for impl in IMPLS if impl in train and impl in back}))
        for op, t in rows:
            cells = [_ms(t.get(impl)) for impl in IMPLS]
            lines.append(f"| {case} | {op} | {' | '.join(cells)} | "
                         f"{_ratio(t.get('torch'), t.get('cupybn'))} | {_ratio(t.get('cupybn'), copy)} |")
    lines += ["", "| case | MB of x | copy ms | copy GB/s (read+write) |", "|---|---:|---:|---:|"]
    for case, ops in medians.items():
        copy = ops.get("copy", {}).get("copy")
        if copy is not None:
            mb = nbytes[case] / 1e6
            lines.append(f"| {case} | {mb:.1f} | {_ms(copy)} | {2 * mb / copy:.1f} |")
    return "\n".join(lines)


def save(machine: dict, medians: dict, nbytes: dict | None, prefix: str = "cpu") -> Path:
    today = date.today().isoformat()
    stem = f"{prefix}-{machine.get('cores', 'N')}core-{today}"
    path = RESULTS / f"{stem}.json"
    run = 1
    while path.exists():  # a second run on the same day keeps the first
        run += 1
        path = RESULTS / f"{stem}-run{run}.json"
    RESULTS.mkdir(exist_ok=True)
    doc = {"machine": machine, "date": today, "medians_ms": medians}
    if nbytes is not None:
        doc["x_bytes"] = nbytes
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="file written by pytest --benchmark-json")
    parser.add_argument("--save", action="store_true", help="write the medians to benchmarks/results/")
    parser.add_argument("--epilogue", action="store_true", help="report bench_epilogue.py's benchmarks")
    args = parser.parse_args(argv)
    if args.epilogue:
        machine, epilogue = load_epilogue(args.json)
        print(epilogue_markdown(machine, epilogue))
        if args.save:
            print(f"\nsaved {save(machine, epilogue, None, prefix='epilogue-cpu')}")
        return
    machine, medians, nbytes = load(args.json)
    print(markdown(machine, medians, nbytes))
    if args.save:
        print(f"\nsaved {save(machine, medians, nbytes)}")


if __name__ == "__main__":
    main()
