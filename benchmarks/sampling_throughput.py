"""GPU sampling throughput of full-size SD-1.5-architecture UNet + VAE (random weights, same FLOPs).

Measures, in one run: (a) the official AnomalyDiffusion sampling cost (fp32, batch 8, 200 DDIM
steps with eta=1, 256 px, no guidance, explicit-softmax attention as in the LDM code) and (b) our
path (bf16, large batch, SDPA) at the same 200 DDIM steps and with DPM-Solver++ at 25 steps:
images/s, peak memory, UNet TFLOP/s (FLOPs counted with ``torch.utils.flop_counter``) against the
GPU's measured dense bf16 matmul peak; then the UNet step time with channels_last, fused QKV,
torch.compile and CUDA graphs (compile mode ``reduce-overhead``), to say which helped by how much.

    PYTHONPATH=src python benchmarks/sampling_throughput.py [--batch 64] [--json out.json]

Without a CUDA GPU it says so and exits 0. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from common import cuda_time, matmul_peak, unet_flops

UNET_CONFIG = dict(  # Stable Diffusion 1.5 UNet
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
VAE_CONFIG = dict(  # Stable Diffusion 1.5 VAE
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    scaling_factor=0.18215,
)
RESOLUTION, LATENT, TEXT_TOKENS = 256, 32, 77


def build(dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG).to("cuda", dtype).eval().requires_grad_(False)
    vae = AutoencoderKL(**VAE_CONFIG).to("cuda", dtype).eval().requires_grad_(False)
    return unet, vae


def backbone_of(unet, vae, dtype):
    from anomalygen.diffusion.backbone import Backbone
    from anomalygen.diffusion.tiny import SCALED_LINEAR_SCHEDULE

    return Backbone(unet, vae, None, None, dict(SCALED_LINEAR_SCHEDULE), "sd15-random", torch.device("cuda"), dtype)


def run_sampling(backbone, batch: int, sampler: str, steps: int, eta: float) -> dict:
    """Full sampling (our ``sample_latents`` + chunked VAE decode): images/s and peak memory."""
    from anomalygen.diffusion.sampling import decode_latents, sample_generators, sample_latents

    ctx = torch.randn(batch, TEXT_TOKENS, 768, device="cuda", dtype=backbone.dtype)

    def once():
        latents = sample_latents(backbone, ctx, sample_generators(0, range(batch)), latent_size=(LATENT, LATENT),
                                 sampler=sampler, num_inference_steps=steps, eta=eta)
        return decode_latents(backbone, latents, chunk_size=16)

    sample_latents(backbone, ctx, sample_generators(0, range(batch)), latent_size=(LATENT, LATENT), sampler=sampler,
                   num_inference_steps=2, eta=eta)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    images = once()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert torch.isfinite(images).all()
    return {"images_per_s": batch / seconds, "seconds": seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def step_time(unet, batch: int, dtype, channels_last: bool = False) -> float:
    """Median seconds of one UNet forward at ``batch`` (random inputs, one fixed timestep tensor)."""
    x = torch.randn(batch, 4, LATENT, LATENT, device="cuda", dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ctx = torch.randn(batch, TEXT_TOKENS, 768, device="cuda", dtype=dtype)
    t = torch.tensor(500, device="cuda")
    with torch.no_grad():
        return cuda_time(lambda: unet(x, t, encoder_hidden_states=ctx).sample, repeats=10, warmup=3)


def recorder(args, flops, results, save):
    """A function that stores one UNet step variant's numbers and prints its line."""
    variants = results.setdefault("unet_step_variants", {})

    def record(name, seconds, **extra):
        variants[name] = {**extra, "step_s": seconds, "tflops": flops * args.batch / seconds / 1e12,
                          "images_per_s_200": args.batch / (200 * seconds), "images_per_s_25": args.batch / (25 * seconds)}
        print(f"  {name:52s} {seconds * 1e3:8.1f} ms/step  {variants[name]['tflops']:6.0f} TFLOP/s", flush=True)
        save()

    return record


def compiled_runs(args, unet, vae, flops, peak, results, save) -> int:
    """Second run: plain compile (no layout/QKV changes), then end-to-end sampling with the best setup."""
    record = recorder(args, flops, results, save)
    record("eager", step_time(unet, args.batch, torch.bfloat16))
    start = time.perf_counter()
    compiled = torch.compile(unet)
    step_time(compiled, args.batch, torch.bfloat16)
    record("compile default, plain", step_time(compiled, args.batch, torch.bfloat16), compile_s=time.perf_counter() - start)
    torch._dynamo.reset()
    unet.to(memory_format=torch.channels_last)
    unet.fuse_qkv_projections()
    backbone = backbone_of(torch.compile(unet, mode="reduce-overhead"), vae, torch.bfloat16)
    rows = results.setdefault("sampling", {})
    for sampler, steps, eta in (("dpm++", 25, 0.0), ("ddim", 200, 1.0)):
        start = time.perf_counter()
        run_sampling(backbone, args.batch, sampler, steps, eta)  # compiles / records graphs
        row = run_sampling(backbone, args.batch, sampler, steps, eta)
        row["tflops"] = flops * args.batch * steps / row["seconds"] / 1e12
        row["first_run_s"] = time.perf_counter() - start - row["seconds"]
        rows[f"(c) compiled + CUDA graphs + cl + fused QKV, b{args.batch}, {sampler} {steps}"] = row
        print(f"  end to end {sampler} {steps}: {row['images_per_s']:.2f} images/s, {row['tflops']:.0f} TFLOP/s "
              f"({100 * row['tflops'] / peak:.0f}% of peak), peak {row['peak_gib']:.1f} GiB", flush=True)
        save()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="batch of our bf16 path")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--modes", default="default,reduce-overhead",
                        help="torch.compile modes to try (max-autotune-no-cudagraphs autotunes for over 5 min)")
    parser.add_argument("--only-compiled", action="store_true",
                        help="skip (a), (b) and the eager variants except plain eager (a second, shorter run)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("sampling_throughput: no CUDA GPU available, benchmark skipped")
        return 0
    from diffusers.models.attention_processor import AttnProcessor

    results: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    import diffusers

    results["diffusers"] = diffusers.__version__
    results["bf16_matmul_peak_tflops"] = peak = matmul_peak()
    print(f"{results['gpu']}: measured bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)

    rows = []
    if args.only_compiled:
        torch.backends.cuda.matmul.allow_tf32 = False
        unet, vae = build(torch.bfloat16)
        flops = unet_flops(unet, torch.bfloat16, LATENT, TEXT_TOKENS)
        return compiled_runs(args, unet, vae, flops, peak, results, save)
    # (a) official-like: fp32, batch 8, DDIM 200, eta 1, explicit attention
    torch.backends.cuda.matmul.allow_tf32 = False
    unet, vae = build(torch.float32)
    flops = unet_flops(unet, torch.float32, LATENT, TEXT_TOKENS)
    results["unet_gflop_per_image_step"] = flops / 1e9
    print(f"UNet: {flops / 1e9:.1f} GFLOP per image per step at {RESOLUTION} px", flush=True)
    unet.set_attn_processor(AttnProcessor())
    official = run_sampling(backbone_of(unet, vae, torch.float32), 8, "ddim", 200, 1.0)
    official["tflops"] = flops * 8 * 200 / official["seconds"] / 1e12  # approx: decode time included
    rows.append(("(a) official-like fp32, b8, DDIM 200", official))
    del unet, vae
    torch.cuda.empty_cache()

    # (b) ours: bf16, SDPA, large batch
    unet, vae = build(torch.bfloat16)
    backbone = backbone_of(unet, vae, torch.bfloat16)
    ours200 = run_sampling(backbone, args.batch, "ddim", 200, 1.0)
    ours200["tflops"] = flops * args.batch * 200 / ours200["seconds"] / 1e12
    rows.append((f"(b) ours bf16 SDPA, b{args.batch}, DDIM 200", ours200))
    ours25 = run_sampling(backbone, args.batch, "dpm++", 25, 0.0)
    ours25["tflops"] = flops * args.batch * 25 / ours25["seconds"] / 1e12
    rows.append((f"(b) ours bf16 SDPA, b{args.batch}, DPM++ 25", ours25))
    results["sampling"] = {name: row for name, row in rows}
    save()

    # UNet step variants (bf16, our batch)
    variants = results.setdefault("unet_step_variants", {})
    record = recorder(args, flops, results, save)


    record("eager", step_time(unet, args.batch, torch.bfloat16))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                record(f"eager, SDPA {backend.name.lower()}", step_time(unet, args.batch, torch.bfloat16))
        except RuntimeError as error:
            print(f"  SDPA {backend.name}: unavailable ({str(error).splitlines()[0][:80]})")
    record(f"eager, batch {2 * args.batch} (per {args.batch})", step_time(unet, 2 * args.batch, torch.bfloat16) / 2)
    unet.to(memory_format=torch.channels_last)
    record("eager + channels_last", step_time(unet, args.batch, torch.bfloat16, channels_last=True))
    unet.fuse_qkv_projections()
    record("eager + channels_last + fused QKV", step_time(unet, args.batch, torch.bfloat16, channels_last=True))
    for mode in filter(None, args.modes.split(",")):
        name = f"compile {mode} + channels_last + fused QKV"
        start = time.perf_counter()
        try:
            compiled = torch.compile(unet, mode=mode)
            step_time(compiled, args.batch, torch.bfloat16, channels_last=True)  # compiles
            compile_s = time.perf_counter() - start
            record(name, step_time(compiled, args.batch, torch.bfloat16, channels_last=True), compile_s=compile_s)
        except Exception as error:  # report and go on with the other variants
            print(f"  {name}: failed ({type(error).__name__}: {str(error).splitlines()[0][:100]})", flush=True)
        torch._dynamo.reset()
    results["best_variant"] = min(variants, key=lambda k: variants[k]["step_s"])
    save()

    print(f"\n{'configuration':46s} {'img/s':>8s} {'x (a)':>7s} {'peak GiB':>9s} {'TFLOP/s':>8s} {'% peak':>7s}")
    for name, row in rows:
        print(f"{name:46s} {row['images_per_s']:8.2f} {row['images_per_s'] / official['images_per_s']:7.1f} "
              f"{row['peak_gib']:9.1f} {row['tflops']:8.0f} {100 * row['tflops'] / peak:6.0f}%")
    base = variants["eager"]["step_s"]
    print(f"\n{'UNet step variant (bf16, b' + str(args.batch) + ')':46s} {'ms':>8s} {'speedup':>8s} {'TFLOP/s':>8s} {'% peak':>7s} {'img/s@200':>9s} {'img/s@25':>9s}")
    for name, row in variants.items():
        print(f"{name:46s} {row['step_s'] * 1e3:8.1f} {base / row['step_s']:8.2f} {row['tflops']:8.0f} "
              f"{100 * row['tflops'] / peak:6.0f}% {row['images_per_s_200']:9.2f} {row['images_per_s_25']:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
