"""Fit AnomalyDiffusion and textual inversion a few steps on the tiny preset; save what was learned.

Run under ``torchrun --nproc_per_node N`` (gloo, CPU) by tests/test_ddp.py, each rank writes
``<out>/<method>-rank<r>.safetensors`` (+ ``.json``: the rows of its UNet calls); imported, ``fit_all(out, "single")`` is the one-process
reference on the same global batch.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from anomalygen.methods.base import create
from anomalygen.types import DefectExample

COMMON = dict(model="tiny", device="cpu", resolution=32, batch_size=4, max_steps=3, checkpoint_every=0)
METHODS = {
    "anomalydiffusion": dict(COMMON, spatial_encoder="tiny"),
    "textual-inversion": dict(COMMON, lr=1e-2),
}


def toy_data():
    rng = np.random.default_rng(0)
    defects = []
    for i in range(4):
        image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        mask = np.zeros((40, 48), bool)
        mask[6 + 3 * i:16 + 4 * i, 8 + 2 * i:30] = True  # different areas: per-sample normalisation matters
        defects.append(DefectExample(image, mask, ["crack", "hole"][i % 2]))
    return defects, [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)]


def learned(method: str, generator) -> dict[str, torch.Tensor]:
    if method == "textual-inversion":
        return {"vectors": generator.embeddings.vectors.detach().clone()}
    return {f"{name}.{k}": v.detach().clone() for name, module in generator._trainable().items()
            for k, v in module.state_dict().items()}


def initial(method: str, generator) -> dict[str, torch.Tensor]:
    """What ``learned`` holds before training (fit starts from exactly this)."""
    if method == "textual-inversion":
        return {"vectors": generator._setup()[1].word_embedding(generator.options["init_word"]).expand(2, -1).clone()}
    generator._build(["crack", "hole"])
    return learned(method, generator)


def fit_all(out: Path, tag: str) -> None:
    """Fit every method; ``tag`` "single" also writes the state before training (tag "initial")."""
    defects, good = toy_data()
    for method, options in METHODS.items():
        torch.manual_seed(0)
        generator = create(method, **options)
        if tag == "single":
            save_file(initial(method, generator), str(out / f"{method}-initial.safetensors"))
        backbone = generator._setup()[0] if method == "textual-inversion" else generator.backbone
        rows: list[int] = []  # the batch rows of every UNet call: a rank computes its share only
        handle = backbone.unet.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
        try:
            generator.fit(defects, good)
        finally:
            handle.remove()
        save_file(learned(method, generator), str(out / f"{method}-{tag}.safetensors"))
        (out / f"{method}-{tag}.json").write_text(json.dumps({"unet_rows": rows}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    fit_all(Path(sys.argv[1]), f"rank{os.environ['RANK']}")
