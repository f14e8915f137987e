"""Fashion-MNIST rows over seeds: mean ± sd of the deployed and float-bias accuracy per
setting and method, from the ``table.json`` that ``fmnist_table.py`` writes per seed.

    python benchmarks/fmnist_seeds.py runs/fmnist-s0 runs/fmnist-s1 runs/fmnist-s2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="output folders of fmnist_table.py, one per seed")
    args = p.parse_args()
    rows = [r for d in args.runs for r in json.loads((Path(d) / "table.json").read_text())]
    by: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        by.setdefault((r["setting"], r["method"]), []).append(r)
    print("| setting | method | seeds | as deployed | float bias | deployed − float bias |")
    print("|---|---|---|---|---|---|")
    settings = dict.fromkeys(s for s, m in by if m != "fp32")
    for setting in settings:
        for method in ("ste", "ab", "lsq"):
            runs = by.get((setting, method))
            if not runs:
                continue
            dep = [r["acc"] for r in runs]
            flt = [r["acc_float_bias"] for r in runs]
            gap = [d - f for d, f in zip(dep, flt, strict=True)]
            seeds = ", ".join(str(r.get("seed", "?")) for r in runs)
            print(f"| {setting} | {method.upper()} | {seeds} | {_ms(dep)} | {_ms(flt)} | "
                  f"{_ms(gap)} |")
    print("\n| setting | AB − STE (deployed), per seed | mean ± sd |\n|---|---|---|")
    for setting in settings:
        ste = {r.get("seed"): r["acc"] for r in by.get((setting, "ste"), [])}
        ab = {r.get("seed"): r["acc"] for r in by.get((setting, "ab"), [])}
        diffs = [ab[s] - ste[s] for s in ab if s in ste]
        if diffs:
            print(f"| {setting} | {', '.join(f'{d:+.2f}' for d in diffs)} | {_ms(diffs)} |")
    fp = [r["acc"] for r in by.get(("fp32", "fp32"), [])]
    if fp:
        print(f"\nfp32 start: {_ms(fp)} over {len(fp)} seeds")


if __name__ == "__main__":
    main()
