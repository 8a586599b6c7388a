"""Markdown summary of a pytest-benchmark JSON file from benchmarks/.

    python benchmarks/report.py bench.json           # print the tables
    python benchmarks/report.py bench.json --save    # also write benchmarks/results/<machine>-<date>.json

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
        medians[info["case"]][info["op"]][info["impl"]] = b["stats"]["median"] * 1e3
        nbytes[info["case"]] = info["nbytes"]
    machine = dict(doc["machine_info"].get("cupybn", {}))
    machine.setdefault("platform", doc["machine_info"].get("platform"))
    return machine, {case: dict(ops) for case, ops in medians.items()}, nbytes


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


def save(machine: dict, medians: dict, nbytes: dict) -> Path:
    today = date.today().isoformat()
    stem = f"cpu-{machine.get('cores', 'N')}core-{today}"
    path = RESULTS / f"{stem}.json"
    run = 1
    while path.exists():  # a second run on the same day keeps the first
        run += 1
        path = RESULTS / f"{stem}-run{run}.json"
    RESULTS.mkdir(exist_ok=True)
    doc = {"machine": machine, "date": today, "x_bytes": nbytes, "medians_ms": medians}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="file written by pytest --benchmark-json")
    parser.add_argument("--save", action="store_true", help="write the medians to benchmarks/results/")
    args = parser.parse_args(argv)
    machine, medians, nbytes = load(args.json)
    print(markdown(machine, medians, nbytes))
    if args.save:
        print(f"\nsaved {save(machine, medians, nbytes)}")


if __name__ == "__main__":
    main()
