"""How much of the UNet's cross-attention AnomalyXFusion's X-embedding tokens get, under the
authors' placement (``placement=template``: e_t at the "*" of "a photo of a *", through the text
encoder) and ours (``placement=caption``: e_t appended after the caption's 77 token states).

For each placement: fit on a dataset (MVTec layout, with its MVTec Caption file), then generate and
record, at every sampling step and cross-attention layer, the attention probabilities (averaged
over heads and pixels) that fall on the X-token positions. Reported: that share (mean over layers,
steps and samples), the share a uniform attention would give (tokens / context length), and the
share of the start token.

    PYTHONPATH=src python benchmarks/anomalyxfusion_attention.py ../shared/data/mvtec_ad_grid_subset --category grid \\
        --captions ../shared/data/mvtec_caption/mvtec_ad.json [--model tiny] [--steps 60] [--resolution 32]

With ``--model tiny`` (the default here: no real weights offline) the base model is a random
initialisation: the figures show where the tokens sit and how training moves the share, not
what SD 1.5 would do; run it with ``--model`` a real SD 1.5 folder for that.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from anomalygen import pipeline
from anomalygen.data.images import load_image
from anomalygen.diffusion.attention import AttentionRecorder, install_hooks, remove_hooks
from anomalygen.methods.anomalyxfusion.generator import X_TOKEN
from anomalygen.methods.base import AnomalyGenerator


def measure(model: AnomalyGenerator, good: list[np.ndarray], samples: int) -> dict[str, float]:
    unet = model.backbone.unet
    count = 3 * model.opt["tokens"] if model.opt["mif"] else model.opt["tokens"]
    if model.opt["placement"] == "caption":
        x_positions = list(range(77, 77 + count))
    else:
        encoded = model.template_encoder(count)([model.opt["template"].replace("*", X_TOKEN)],
                                                {X_TOKEN: torch.zeros(count, model.width)})
        x_positions = encoded.positions[X_TOKEN][0]
    recorder, shares, starts, lengths = AttentionRecorder(), [], [], []

    def collect(module, args, output):
        for probs in recorder.maps.values():  # (B, N, S), averaged over heads
            shares.append(float(probs[..., x_positions].sum(-1).mean()))
            starts.append(float(probs[..., 0].mean()))
            lengths.append(probs.shape[-1])
        recorder.maps.clear()

    handle = install_hooks(unet, lambda layer: [recorder] if layer.kind == "cross" else [])
    hook = unet.register_forward_hook(collect)
    try:
        list(model.generate(good, samples, seed=0))
    finally:
        hook.remove()
        remove_hooks(unet, handle)
    return {"x_share": float(np.mean(shares)), "uniform": count / float(np.mean(lengths)), "start": float(np.mean(starts)),
            "tokens": count, "context": int(np.mean(lengths))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--category", required=True)
    parser.add_argument("--captions", type=Path, required=True)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--sampling-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    good = [load_image(p) for p in sorted((args.data / "train" / "good").glob("*.png"))[:4]]
    print("| placement | trained steps | X tokens / context | X-token attention share | uniform share | start-token share |")
    print("|---|---:|---:|---:|---:|---:|")
    for placement in ("template", "caption"):
        options = dict(model=args.model, device="cpu", resolution=args.resolution, max_steps=args.steps, batch_size=4,
                       num_inference_steps=args.sampling_steps, checkpoint_every=0, placement=placement, captions=str(args.captions),
                       category=args.category, mask_augment=False)
        with tempfile.TemporaryDirectory() as folder:
            for steps in (0, args.steps):
                out = Path(folder) / f"model-{steps}"
                pipeline.fit("anomalyxfusion", args.data, out, options={**options, "max_steps": max(steps, 1)} if steps
                             else {**options, "max_steps": 1, "lr": 1e-12})
                m = measure(AnomalyGenerator.load(out), good, args.samples)
                print(f"| {placement} | {steps or 'untrained'} | {m['tokens']} / {m['context']} | {m['x_share']:.1%} | {m['uniform']:.1%} | "
                      f"{m['start']:.1%} |", flush=True)


if __name__ == "__main__":
    main()
