"""Fit AnomalyDiffusion, textual inversion, DualAnoDiff, CAGen and AnomalyXFusion a few steps on the tiny preset; save what was learned.

Run as ``torchrun --nproc_per_node N ddp_fit.py OUT DATA`` (gloo, CPU) by tests/integration/test_ddp.py, each rank writes
``<out>/<method>-rank<r>.safetensors`` (+ ``.json``: the rows of its UNet calls), then runs ``anomalygen fit
CLI_FIT --data DATA --out OUT/cli-fit``; imported, ``fit_all(out, "single")`` is the one-process reference on
the same global batch.
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
    # lr large enough to move every weight in 3 steps (E's equalized heads give its deepest layers tiny gradients)
    "anomalydiffusion": dict(COMMON, spatial_encoder="tiny", lr=0.1),
    "textual-inversion": dict(COMMON, lr=1e-2),
    # both LoRA branches, the text-encoder LoRA, SAIM and BCM; lr large enough to move every weight in 3 steps
    "dualanodiff": dict(COMMON, lr=1e-2, rank=4),
    "cagen": dict(COMMON, lr=1e-2),  # the ControlNet (its zero convolutions first, then the rest)
    "anomalyxfusion": dict(COMMON, lr=1e-2, tokens=2, mask_embedding=16),  # MIF (mask encoder, e_tex, aggregator) + DDF
}
ROWS_PER_SAMPLE = {"dualanodiff": 3}  # whole, part and background rows in one UNet call


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
        return {"tokens": generator.embeddings.tokens.detach().clone()}
    if method == "dualanodiff":
        from anomalygen.diffusion.lora import adapter_names, trainable_parameters

        out = {f"{name}.{i}": p.detach().clone() for model in generator._models() for name in adapter_names(model)
               for i, p in enumerate(trainable_parameters(model, name))}
        out.update({f"{t}.{n}.{k}": v.detach().clone() for t, modules in generator.interaction.items()
                    for n, m in modules.items() for k, v in m.state_dict().items()})
        return out
    if method == "cagen":
        return {f"controlnet.{k}": v.detach().clone() for k, v in generator.controlnet.state_dict().items()}
    if method == "anomalyxfusion":
        return {f"{name}.{k}": v.detach().clone() for name, module in generator.modules().items()
                for k, v in module.named_parameters()}
    return {f"{name}.{k}": v.detach().clone() for name, module in generator._trainable().items()
            for k, v in module.state_dict().items()}


def initial(method: str, generator) -> dict[str, torch.Tensor]:
    """What ``learned`` holds before training (fit starts from exactly this)."""
    if method == "textual-inversion":
        return {"tokens": generator.prompts.word_embedding(generator.opt["init_word"]).float().expand(2, 1, -1).clone()}
    if method == "dualanodiff":
        generator._defect_types = ["crack", "hole"]
        for k in range(2):
            generator._add_branches(k)
        generator._freeze_adapters()
        return learned(method, generator)
    if method == "cagen":  # the ControlNet fit builds, from the same seed
        from anomalygen.methods.cagen.control import build_controlnet

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(generator.opt["seed"])
            generator.controlnet = build_controlnet(generator.backbone.unet, generator.backbone.vae_scale_factor)
        return learned(method, generator)
    if method == "anomalyxfusion":
        generator._setup(toy_data()[0])
        return learned(method, generator)
    generator._build(["crack", "hole"])
    return learned(method, generator)


def fit_all(out: Path, tag: str) -> None:
    """Fit every method; ``tag`` "single" also writes the state before training (tag "initial")."""
    defects, good = toy_data()
    for method, options in METHODS.items():
        if tag == "single":
            save_file(initial(method, create(method, **options)), str(out / f"{method}-initial.safetensors"))
        torch.manual_seed(0)
        generator = create(method, **options)
        backbone = generator.backbone
        rows: list[int] = []  # the batch rows of every UNet call: a rank computes its share only
        handle = backbone.unet.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
        try:
            generator.fit(defects, good)
        finally:
            handle.remove()
        save_file(learned(method, generator), str(out / f"{method}-{tag}.safetensors"))
        (out / f"{method}-{tag}.json").write_text(json.dumps({"unet_rows": rows}))


CLI_FIT = ["fit", "--method", "textual-inversion", "--category", "fabric", "--model", "tiny", "--max-steps", "3", "--device", "cpu",
           "--set", "batch_size=4", "--set", "resolution=32", "--set", "lr=0.01", "--set", "checkpoint_every=0"]


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    fit_all(out, f"rank{os.environ['RANK']}")
    # then the command line's fit, as `accelerate launch -m anomalygen fit` runs it: the first process
    # alone saves, and main() closes the gloo group accelerate opened before exit (left to the
    # interpreter's teardown, a rank was once seen aborting: "terminate called without an active exception")
    from anomalygen.cli import main

    sys.argv = ["anomalygen", *CLI_FIT, "--data", sys.argv[2], "--out", str(out / "cli-fit")]
    main()
