"""The validity filter on real data: the real training pairs' pass rate per check, and each model-free
method's rejection rates before (first draw) and after the redraws.

    PYTHONPATH=src python benchmarks/validity_rates.py --data ../shared/data/magnetic_tile --num 300 --out rates.json

For every category folder given: calibrate on the paper split's training third (as ``generate``
does), report the share of those real pairs that pass each check, then generate ``--num`` samples
per method with the filter on (``--max-attempts`` draws at most) and report, per defect type, the
share of samples whose first draw was rejected, the share still failing, and the rejected draws
per check (``anomalygen.evaluation.rejections.rejection_rates`` over the written manifest).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from anomalygen import pipeline
from anomalygen.data import load_category, load_defects, paper_split
from anomalygen.evaluation.rejections import rejection_rates
from anomalygen.generation.validity import CHECKS, fit_category


def real_pass_rates(folder: Path) -> dict[str, float]:
    data = load_category(folder, skip_bad=True)
    calibration = fit_category(data)
    train, _ = paper_split(data.defects)
    rows = [[result.passed for result in calibration.check(ex.image, ex.mask, ex.defect_type).values()]
            for records in train.values() for ex in load_defects(records, skip_bad=True)]
    return {"pairs": len(rows), **dict(zip(CHECKS, np.mean(rows, axis=0).tolist()))}


def method_rates(folder: Path, method: str, num: int, max_attempts: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        result = pipeline.generate(method, folder, out, num, seed=0, max_attempts=max_attempts, skip_bad=True)
        lines = [json.loads(line) for line in (result.out / "manifest.jsonl").read_text().splitlines()]
    return rejection_rates(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", required=True, help="category folders")
    parser.add_argument("--methods", default="cutpaste,croppaste,draem")
    parser.add_argument("--num", type=int, default=300)
    parser.add_argument("--max-attempts", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {}
    for folder in map(Path, args.data):
        results[folder.name] = {"real_pairs_pass": real_pass_rates(folder)}
        print(folder.name, "real pairs pass:", json.dumps(results[folder.name]["real_pairs_pass"]), flush=True)
        for method in args.methods.split(","):
            rates = method_rates(folder, method, args.num, args.max_attempts)
            results[folder.name][method] = rates
            total = rates.get("all", {})
            print(f"{folder.name} {method}: first draw rejected {total.get('rejected_first', 0):.1%}, still failing "
                  f"{total.get('kept_failing', 0):.1%}, rejected draws {total.get('rejected_draws')}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
