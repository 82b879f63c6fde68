"""The SHA-256 of every file a fixed-seed ``fit`` + ``generate`` writes, for every method: proof that a
refactoring changed no behaviour.

    python tools/output_hashes.py --out hashes.json            # record (tiny preset, demo data)
    python tools/output_hashes.py --check hashes.json          # compare with a record; exit 1 on a difference
    python tools/output_hashes.py --out h.json --methods cutpaste,draem

Generation runs with ``--no-filter``: the tiny models' noise and the 64 px demo fail the validity
checks, and the redraws took longer than the check (a first draw is what every redraw starts from;
the filter's own behaviour has its tests). Each method is fitted through the CLI on a small demo category (``nut``, 64 px) with ``--model tiny`` at
32 px and 2 steps (diffusion methods), then generates 4 samples with seed 0. Every file is hashed byte
for byte after the temporary work folder's path (recorded in run.json and the manifest) is replaced
by ``WORK``; JSON fields that record times are dropped first; a safetensors file is hashed by its
metadata and tensors, not by its header's key order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

VOLATILE = {"seconds", "started", "finished", "elapsed", "time", "timestamp", "wall_s", "created", "duration_s"}
DIFFUSION_OPTIONS = ["--model", "tiny", "--max-steps", "2", "--set", "resolution=32", "--set", "num_inference_steps=2"]


def _stable(value):
    """A JSON value without the fields that record times or where things were."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in sorted(value.items()) if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _tensors(path: Path) -> bytes:
    """A safetensors file's content: its metadata and every tensor (name, dtype, shape, bytes) in name
    order. peft writes a LoRA's ``target_modules`` (a set) in the string-hash order of the process, so
    lists of names in JSON metadata are compared sorted."""
    from safetensors import safe_open

    def canonical(value):
        if isinstance(value, dict):
            return {k: canonical(v) for k, v in value.items()}
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return sorted(value)
        return value

    def parsed(text: str):
        try:
            return canonical(json.loads(text))
        except ValueError:
            return text

    with safe_open(str(path), "np") as f:
        metadata = {k: parsed(v) for k, v in (f.metadata() or {}).items()}
        parts = [json.dumps(metadata, sort_keys=True).encode()]
        for name in sorted(f.keys()):
            array = f.get_tensor(name)
            parts += [name.encode(), str(array.dtype).encode(), str(array.shape).encode(), array.tobytes()]
    return b"\0".join(parts)


def digest(path: Path, work: Path) -> str:
    data = _tensors(path) if path.suffix == ".safetensors" else path.read_bytes()
    if path.suffix in (".json", ".jsonl", ".txt", ".html"):
        data = data.replace(str(work).encode(), b"WORK")
    if path.suffix in (".json", ".jsonl"):
        try:
            lines = [json.loads(line) for line in data.splitlines() if line.strip()] if path.suffix == ".jsonl" \
                else [json.loads(data)]
        except ValueError:
            pass
        else:
            data = json.dumps([_stable(v) for v in lines], sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def folder_hashes(folder: Path, work: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): digest(p, work) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".anomalygen.lock"}


def run(command: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "anomalygen.cli", *command], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)}: exit {result.returncode}\n{result.stderr[-2000:]}")


def method_hashes(method: str, data: Path, work: Path) -> dict[str, str]:
    from anomalygen.methods.base import get_method

    extra = DIFFUSION_OPTIONS if "model" in get_method(method).OPTIONS else []  # a base model: a diffusion method
    model, out = work / f"model-{method}", work / f"out-{method}"
    run(["fit", "--method", method, "--data", str(data), "--category", "nut", "--out", str(model), *extra])
    run(["generate", "--checkpoint", str(model), "--data", str(data), "--category", "nut", "--out", str(out),
         "--num", "4", "--seed", "0", "--no-filter"])
    return {**{f"model/{k}": v for k, v in folder_hashes(model, work).items()},
            **{f"out/{k}": v for k, v in folder_hashes(out, work).items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, help="write the hashes here")
    target.add_argument("--check", type=Path, help="compare with hashes written by --out")
    parser.add_argument("--methods", help="comma-separated methods (default: every registered method)")
    args = parser.parse_args()

    from anomalygen.data.demo import make_demo_dataset
    from anomalygen.methods.base import available_methods

    methods = args.methods.split(",") if args.methods else available_methods()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_demo_dataset(work / "demo", seed=0, n_good=6, n_test_good=2, n_defect=3, size=64,
                                 categories=("nut",))
        hashes = {}
        for method in methods:
            hashes[method] = method_hashes(method, data, work)
            print(f"{method}: {len(hashes[method])} files", flush=True)
    if args.out:
        args.out.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
        return
    recorded = json.loads(args.check.read_text())
    differ = [f"{m}/{f}" for m in methods for f in sorted(set(hashes[m]) | set(recorded.get(m, {})))
              if hashes[m].get(f) != recorded.get(m, {}).get(f)]
    print("\n".join(differ) or "identical")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
