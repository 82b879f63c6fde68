"""Time the product itself: ``anomalygen fit``, ``generate`` and ``evaluate`` as a user runs them (each
in its own process, wall time from start to exit), our defaults beside an official-like configuration.

The base model is a full-size architecture built from its published config with random weights and
saved as a local diffusers folder (``--arch ldm`` for AnomalyDiffusion's LDM text2im-large-256,
``sd15`` for the others; ``tiny`` for a CPU smoke run; ``--model-dir`` keeps it for a second run);
the data are the procedural demo category at ``--size`` px. Rows, in one run:

- ``fit`` of ``--method`` for ``--fit-steps`` steps, defaults (bf16 on CUDA) and official-like (fp32);
- ``generate --num N`` from each model: defaults (bf16, batch from memory, ``--compile`` if asked)
  and official-like (fp32, batch 4; ``--num-official`` samples, fewer since it is slow);
- with ``--unet-calls K`` (UNet rows per generated image: steps x 2 with CFG) on CUDA: the UNet's
  share of the measured bf16 matmul peak over the whole command (FLOPs counted on one row);
- ``evaluate --metrics localization`` (U-Net, ``--epochs`` x ``--samples-per-epoch``, 256 px, papers:
  200 x 500; the achieved TFLOP/s from the U-Net's counted FLOPs) and ``--metrics classification``
  (ResNet-34, ``--cls-epochs``, papers: 30); ``--epochs 0`` skips them.

A model-free ``--method`` (cutpaste, croppaste, draem) has no fit and one configuration: the fast way
to time the evaluation protocol alone.

    PYTHONPATH=src python benchmarks/cli_speed.py --method anomalydiffusion --arch ldm --out cli_speed
    PYTHONPATH=src python benchmarks/cli_speed.py --arch tiny --size 64 --num 8 --fit-steps 2 --epochs 1 --device cpu \\
        --samples-per-epoch 16 --eval-resolution 64 --cls-epochs 1 \\
        --set resolution=32 --set num_inference_steps=2 --out smoke     # CPU smoke run

writes ``OUT/cli_speed.json`` (after every row) and ``OUT/cli_speed.md``. Images/s counts generated
samples over the whole command (model loading, fitting of masks, writing PNGs included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from common import cli_seconds, matmul_peak, unet_flops

OFFICIAL = {"anomalydiffusion": ["mixed_precision=fp32", "generate_batch_size=4"],
            "cagen": ["mixed_precision=fp32", "generate_batch_size=4"],
            "dualanodiff": ["mixed_precision=fp32", "generate_batch_size=4"],
            "textual-inversion": ["mixed_precision=fp32", "generate_batch_size=4"]}
MODEL_FREE = ("cutpaste", "croppaste", "draem")


def save_model(arch: str, folder: Path) -> str:
    """A random full-size ``arch`` backbone as a diffusers folder (``tiny``: the built-in preset)."""
    if arch == "tiny":
        return "tiny"
    from diffusers import DDIMScheduler, LDMTextToImagePipeline, StableDiffusionPipeline

    from anomalygen.diffusion.architectures import random_backbone

    if not (folder / "model_index.json").is_file():
        b = random_backbone(arch)
        scheduler = DDIMScheduler.from_config(b.scheduler_config)
        if arch == "ldm":
            pipe = LDMTextToImagePipeline(vqvae=b.vae, bert=b.text_encoder, tokenizer=b.tokenizer, unet=b.unet, scheduler=scheduler)
        else:
            pipe = StableDiffusionPipeline(vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        pipe.save_pretrained(folder)
    return str(folder)


def unet_row_tflop(model: str, size: int) -> float:
    """TFLOP of one UNet row (one image, one step) of the saved model at ``size`` px, on CUDA."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=torch.bfloat16).to("cuda")
    flops = unet_flops(unet, torch.bfloat16, size // 8)
    del unet
    torch.cuda.empty_cache()
    return flops / 1e12


def eval_unet_tflop(resolution: int, base: int) -> float:
    """TFLOP of one training sample of the evaluation U-Net (forward + backward ~ 3 x forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    from anomalygen.evaluation.unet import DiscriminativeUNet

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        DiscriminativeUNet(3, 2, base)(torch.zeros(1, 3, resolution, resolution))
    return 3 * counter.get_total_flops() / 1e12


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="anomalydiffusion", choices=sorted(OFFICIAL) + list(MODEL_FREE))
    parser.add_argument("--arch", default="ldm", choices=["ldm", "sd15", "tiny"])
    parser.add_argument("--model-dir", default=None, help="where the random model is saved (default OUT/ARCH-random); "
                        "an existing one is reused")
    parser.add_argument("--size", type=int, default=256, help="demo image size in px")
    parser.add_argument("--num", type=int, default=200, help="samples per generate run")
    parser.add_argument("--num-official", type=int, default=None, help="samples of the official-like run (default --num)")
    parser.add_argument("--only", choices=["ours", "official-like"], default=None, help="time one configuration")
    parser.add_argument("--fit-steps", type=int, default=50)
    parser.add_argument("--unet-calls", type=int, default=0, help="UNet rows per generated image, for the share of peak")
    parser.add_argument("--epochs", type=int, default=200, help="evaluation U-Net epochs (papers: 200; 0: no evaluate)")
    parser.add_argument("--samples-per-epoch", type=int, default=500, help="evaluation U-Net samples per epoch (papers: 500)")
    parser.add_argument("--eval-resolution", type=int, default=256, help="evaluation U-Net px (papers: 256)")
    parser.add_argument("--cls-epochs", type=int, default=30, help="ResNet-34 epochs (papers: 30)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--compile", action="store_true", help="generate with --compile (our configuration)")
    parser.add_argument("--set", action="append", default=[], help="a method option for both configurations")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from anomalygen.data.demo import make_demo_dataset

    data = make_demo_dataset(out / "data", 0, size=args.size, categories=("nut",)) / "nut"
    model_free = args.method in MODEL_FREE
    model = None if model_free else save_model(args.arch, Path(args.model_dir or out / f"{args.arch}-random"))
    cuda = torch.cuda.is_available() and args.device != "cpu"
    result = {"method": args.method, "arch": None if model_free else args.arch, "size": args.size, "compile": args.compile,
              "sets": args.set, "rows": [], "python": sys.version.split()[0], "host_cpus": os.cpu_count()}
    if cuda:
        result.update(gpu=torch.cuda.get_device_name(), bf16_matmul_peak_tflops=round(matmul_peak(), 1))
        if args.unet_calls and model:
            result.update(unet_calls_per_image=args.unet_calls, unet_row_tflop=unet_row_tflop(model, args.size))
    save = lambda: (out / "cli_speed.json").write_text(json.dumps(result, indent=2))  # noqa: E731
    device = ["--device", args.device] if args.device else []
    common = [f"--set={s}" for s in args.set]
    configs = [("ours", [], args.num)] if model_free else [
        ("ours", [], args.num), ("official-like", [f"--set={s}" for s in OFFICIAL[args.method]], args.num_official or args.num)]
    for config, extra, num in configs:
        if args.only and config != args.only:
            continue
        folder = out / config
        row = {"configuration": config}
        if model_free:
            source = ["--method", args.method, *common]
        else:
            fit_s = cli_seconds(["fit", "--method", args.method, "--data", str(data), "--out", str(folder / "model"),
                                 "--model", model, "--max-steps", str(args.fit_steps), *device, *common, *extra])
            row.update(fit_steps=args.fit_steps, fit_s=round(fit_s, 1), fit_steps_per_s=round(args.fit_steps / fit_s, 3))
            source = ["--checkpoint", str(folder / "model")]
        flags = ["--compile"] if args.compile and config == "ours" else []
        gen_s = cli_seconds(["generate", *source, "--data", str(data), "--out", str(folder / "gen"), "--num", str(num),
                             "--no-filter", "--overwrite", *flags])
        row.update(num=num, generate_s=round(gen_s, 1), generate_images_per_s=round(num / gen_s, 3))
        if "unet_row_tflop" in result:
            tflops = row["generate_images_per_s"] * args.unet_calls * result["unet_row_tflop"]
            row["unet_share_of_peak"] = round(tflops / result["bf16_matmul_peak_tflops"], 3)
        result["rows"].append(row)
        save()
        print(json.dumps(row), flush=True)
    if args.epochs:
        evaluate = ["evaluate", "--generated", str(out / (args.only or "ours") / "gen"), "--data", str(data.parent), "--category", "nut",
                    "--protocol", "clean", "--resolution", str(args.eval_resolution), *device]
        eval_s = cli_seconds([*evaluate, "--metrics", "localization", "--epochs", str(args.epochs),
                              "--samples-per-epoch", str(args.samples_per_epoch)])
        result["evaluate"] = {"localization_s": round(eval_s, 1), "epochs": args.epochs,
                              "samples_per_epoch": args.samples_per_epoch, "resolution": args.eval_resolution}
        if cuda:
            total = eval_unet_tflop(args.eval_resolution, 64) * args.epochs * args.samples_per_epoch
            result["evaluate"].update(unet_pflop=round(total / 1e3, 2), unet_tflops_achieved=round(total / eval_s, 1))
        save()
        cls_s = cli_seconds([*evaluate, "--metrics", "classification", "--cls-epochs", str(args.cls_epochs),
                              "--cls-random-init"])  # no download here; the ImageNet weights cost the same)
        result["evaluate"].update(classification_s=round(cls_s, 1), cls_epochs=args.cls_epochs)
        save()
        print(json.dumps(result["evaluate"]), flush=True)
    (out / "cli_speed.md").write_text(markdown(result))
    print((out / "cli_speed.md").read_text())
    return 0


def markdown(result: dict) -> str:
    rows = result["rows"]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = [f"# anomalygen CLI speed: {result['method']} on {result['arch'] or 'no model'}, {result['size']} px"
             + (f", {result['gpu']} (bf16 matmul peak {result['bf16_matmul_peak_tflops']} TFLOP/s)" if "gpu" in result else ""),
             "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    if len(rows) == 2:
        lines += ["", f"generate speed-up ours / official-like: "
                  f"{rows[0]['generate_images_per_s'] / max(rows[1]['generate_images_per_s'], 1e-9):.2f}x"]
    if "evaluate" in result:
        e = result["evaluate"]
        lines += ["", f"evaluate: U-Net {e['epochs']} epochs x {e['samples_per_epoch']} samples at {e['resolution']} px "
                  f"{e['localization_s']:.0f} s" + (f" ({e['unet_tflops_achieved']} TFLOP/s over {e['unet_pflop']} PFLOP)"
                                                    if "unet_tflops_achieved" in e else "")
                  + (f"; ResNet-34 {e['cls_epochs']} epochs {e['classification_s']:.0f} s" if "classification_s" in e else "")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
