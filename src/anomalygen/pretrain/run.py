"""``pretrain``: a latent diffusion base model trained from scratch on the user's own images.

Two stages, each a run of the shared loop (``diffusion.train.train``: checkpoints, exact resume,
time budget, ``loss.csv``), then a diffusers Stable Diffusion folder:

1. the autoencoder (``AutoencoderKL``): L1 reconstruction + ``kl_weight`` × KL to N(0, I), as the
   KL-regularised autoencoder of LDM (Rombach et al., CVPR 2022, Sec. 3 and App. G: KL weight
   1e-6) without its LPIPS and adversarial terms (their pretrained networks cannot be downloaded
   here). A share ``vae_colour_augment`` (default 0.5) of its training crops is recoloured
   (``data.colour_variants``: channel orders, inversion) so that it encodes colours the good images
   lack (defects, DualAnoDiff's gray part background); LDM's autoencoder gets them from OpenImages.
   0 trains on the images as they are. ``vae_defect_weight`` λ (ours; 0, LDM's objective, by default)
   adds λ × the L1 averaged over the defect pixels of each batch (``include_defects``' masks): an
   L1 autoencoder spends its capacity on the texture around a defect and loses thin lines and small
   blots (measured on the defect world: ``benchmarks/RESULTS.md``). Its latent scale is then set to 1 / std of the training
   latents, as SD's 0.18215 was chosen; its PSNR on held-back good images is reported, and on those
   images in the 11 other colourings (``psnr_recoloured_db``). ``max_steps=0`` stops after this
   stage, and a re-run with more ``vae_steps`` trains the autoencoder on from its last checkpoint,
   so it can be checked and extended before any UNet step is spent on it. Once the UNet stage has
   saved a checkpoint the autoencoder is never trained again (a re-run says so if ``vae_steps`` asks
   for more), so a re-run cannot pull the latents from under the UNet. Its mid-block self-attention
   (LDM's, on in the ``small`` and ``base`` sizes) can be switched off (``vae_attention=False``,
   ``--no-vae-attention``): measured at 64 px over two seeds, the priors without it drew
   hazelnut_toy in its colours more often and magnetic_tile less often, and corner faults came with
   and without it (``benchmarks/RESULTS.md``, "The autoencoder's corner blot"). The default stays LDM's.
2. the UNet (``UNet2DConditionModel``): the ε-prediction loss of DDPM (Ho et al. 2020, Eq. 14) on
   latents of random crops (``unet_defect_weight`` λ, ours, 0 by default: + λ × that loss averaged
   over the latents a defect touches), conditioned on the prompt's text-encoder states; the prompt is dropped
   (empty prompt) with probability ``uncond_prob`` to train the unconditional model that
   classifier-free guidance needs (Ho & Salimans 2022); an EMA of its weights is what is saved.

The text encoder is **frozen** at its (seeded) random initialisation, and not trained with the
UNet, because that is what the methods built on top need:

- textual inversion and LoRA keep the text encoder frozen and optimise, respectively, an input
  embedding fed through it and low-rank updates of the UNet's attention; both need the encoder
  that a method loads to be exactly the one the UNet learned to read: a frozen encoder is, while
  one trained on a handful of fixed prompts would only learn those few context sequences (nothing
  a UNet's cross-attention could not learn itself) and leave every other word's embedding, and
  the placeholder vectors initialised from them, in a region it no longer matches;
- a random CLIP transformer is a fixed, smooth, well-scaled map from any input embedding to
  context vectors, the same for known words and new vectors, so an optimised embedding lands in
  the space the UNet saw; defect words get their meaning from the UNet (``--include-defects``);
- the prompts' hidden states are computed once, which makes each step cheaper.

Layout of ``out``: ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/`` (written at the end of every run with UNet steps, also one stopped by its time budget),
``pretrain.json`` (settings and report), ``samples.png`` and ``loss.png``; the training state
under ``training/`` (``vae/`` and ``unet/`` runs of the shared loop with their ``loss.csv``,
``loss.png`` and ``validation/`` grids; it may be deleted once training is finished).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from anomalygen.devices import resolve_device
from anomalygen.diffusion.backbone import Backbone
from anomalygen.diffusion.sampling import decode_latents, sample_generators, sample_latents, to_uint8
from anomalygen.diffusion.train import LOG_FILE, TrainConfig, latest_checkpoint, load_trainable, save_grid, train
from anomalygen.errors import DataError
from anomalygen.io import LOCK_FILE, atomic_write_text, folder_lock, read_json
from anomalygen.pretrain.data import COLOURINGS, PretrainImages, colour_variant, colour_variants, load_pretrain_images
from anomalygen.pretrain.config import PretrainConfig
from anomalygen.pretrain.models import PRESETS, build_tokenizer, component_configs

SETTINGS = "training/settings.json"
REPORT = "pretrain.json"
# settings that may change when a run is resumed (the others define the model)
RESUMABLE = ("vae_steps", "max_steps", "time_budget_s", "vae_share", "checkpoint_every", "sample_every", "device")
# what runs written before a setting existed did (their settings.json lacks it)
BEFORE_SETTINGS = {"balance": "images", "vae_defect_weight": 0.0, "unet_defect_weight": 0.0}
Say = Callable[[str], None]


def _check_out(out: Path) -> None:
    """A new or empty folder, or one a pretrain run wrote (it resumes); never another folder."""
    if out.is_dir() and not (out / SETTINGS).is_file() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise DataError(out, "not empty and not an anomalygen pretrain folder; give a new or empty folder as `out`")


def _settings(config: PretrainConfig, data: list[Path]) -> dict[str, Any]:
    settings = {k: v for k, v in asdict(config).items() if k not in RESUMABLE}
    return {**settings, "data": [str(Path(d).resolve()) for d in data]}


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    if not (out / SETTINGS).is_file():
        atomic_write_text(out / SETTINGS, json.dumps(settings, indent=2))
        return
    stored = read_json(out / SETTINGS)
    # a run from before vae_attention existed had its size's
    sized = PRESETS[stored["size"]].vae_attention if stored.get("size") in PRESETS else None
    before = {**BEFORE_SETTINGS, "vae_attention": sized, **stored}
    changed = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in settings.items() if before.get(k) != v]
    if changed:
        raise DataError(out, f"holds a pretrain run with other settings ({'; '.join(changed)}); "
                             "re-run with the same settings to resume it, or give a new `out`")


def write_loss_curve(log: Path, png: Path, size: tuple[int, int] = (480, 240)) -> None:
    """``loss.csv`` as a PNG: loss per step (grey) and its running mean (black), log-scaled."""
    with log.open(newline="") as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle) if row.get("loss")]
    losses = [v for v in losses if v > 0 and math.isfinite(v)]
    if len(losses) < 2:
        return
    w, h, pad = *size, 24
    logs = np.log10(losses)
    smooth = np.convolve(logs, np.ones(k := max(1, len(logs) // 20)) / k, mode="valid")
    low, high = float(logs.min()), float(logs.max()) + 1e-9
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)

    def points(values: np.ndarray, offset: int) -> list[tuple[float, float]]:
        return [(pad + (offset + i) * (w - 2 * pad) / (len(logs) - 1), h - pad - (v - low) * (h - 2 * pad) / (high - low))
                for i, v in enumerate(values)]

    draw.line(points(logs, 0), fill=(170, 170, 170))
    draw.line(points(smooth, k // 2), fill=(0, 0, 0), width=2)
    draw.text((pad, 4), f"loss (log10) {10 ** high:.3g} .. {10 ** low:.3g}, {len(losses)} steps", fill=(0, 0, 0))
    image.save(png)


def _build(cls: Any, config: dict[str, Any], seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(CLIPTextConfig(**config)) if cls is CLIPTextModel else cls.from_config(config)


def _save(model: Any, folder: Path) -> None:
    """``save_pretrained`` into a temporary folder renamed into place: ``folder`` is whole or absent
    (the autoencoder, absent, is re-saved from its checkpoints by the next run)."""
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _load_vae(folder: Path) -> AutoencoderKL:
    """The autoencoder ``_save`` wrote, without the ``_name_or_path`` that ``from_pretrained`` records:
    that path of the training folder would reach the model's ``vae/config.json``, and a resumed run
    would differ from an uninterrupted one."""
    with torch.random.fork_rng(devices=[]):  # its random init, overwritten, draws from no generator of ours
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder))
    vae.load_state_dict(load_file(str(folder / "diffusion_pytorch_model.safetensors")))
    return vae


def _psnr(vae: AutoencoderKL, pixels: torch.Tensor) -> float:
    """Mean PSNR (dB) of the posterior-mode reconstructions of (N, 3, R, R) images in [-1, 1]."""
    with torch.no_grad():
        recon = torch.cat([vae(chunk.to(vae.device), sample_posterior=False).sample.float().clamp(-1, 1).cpu()
                           for chunk in pixels.split(16)])
    mse = ((recon - pixels) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def autoencoder_loss(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator, kl_weight: float,
                     masks: torch.Tensor | None = None, defect_weight: float = 0.0) -> torch.Tensor:
    """LDM's autoencoder objective without its LPIPS and adversarial terms: L1 of the reconstruction
    of a posterior sample + ``kl_weight`` × KL(q(z|x) ‖ N(0, I)), both per-image sums as in LDM
    (weight 1e-6 against the summed L1), divided by the pixel count. With ``defect_weight`` λ > 0
    (ours) and (B, H, W) bool ``masks``, + λ × the L1 averaged over the batch's defect pixels, so
    that the defects (1-5 % of a defect image) weigh as much as λ whole images, whatever their size."""
    posterior = vae.encode(pixels).latent_dist
    recon = vae.decode(posterior.sample(generator=generator)).sample
    loss = F.l1_loss(recon.float(), pixels) + kl_weight * posterior.kl().mean() / pixels[0].numel()
    return loss + defect_term((recon.float() - pixels).abs(), masks, defect_weight)


def defect_term(error: torch.Tensor, masks: torch.Tensor | None, weight: float) -> torch.Tensor | float:
    """``weight`` × the (B, C, h, w) ``error`` averaged over channels and over the cells a defect of the
    (B, H, W) bool pixel ``masks`` touches (the masks max-pooled to the error's grid: the identity at
    the same size); 0 without a weight or a defect pixel."""
    if not weight or masks is None or not bool(masks.any()):
        return 0.0
    where = F.adaptive_max_pool2d(masks[:, None].float(), error.shape[-2:])[:, 0].bool().to(error.device)
    return weight * error.mean(1)[where].mean()


def _vae_stage(vae: AutoencoderKL, images: PretrainImages, config: PretrainConfig, work: Path,
               budget: float | None, train_config: dict[str, Any]) -> dict[str, Any]:
    def loss_fn(modules, step, generator):
        model = modules["vae"]
        pixels, _, masks = images.crops(config.batch_size, generator)
        pixels = colour_variants(pixels, generator, config.vae_colour_augment).to(model.device)
        return autoencoder_loss(model, pixels, generator, config.kl_weight, masks, config.vae_defect_weight)

    def validate(step):
        write_loss_curve(work / LOG_FILE, work / "loss.png")
        shown = images.held_back_batch()[:4] if images.held_back else images.batch(4, torch.Generator().manual_seed(0))[0]
        with torch.no_grad():
            recon = vae(shown.to(vae.device), sample_posterior=False).sample.float().cpu()
        return to_uint8((torch.cat([shown, recon]) + 1) / 2)

    result = train({"vae": vae}, loss_fn, TrainConfig(max_steps=config.vae_steps, time_budget_s=budget, lr=config.vae_lr,
                                                        **train_config), work, validate=validate)
    load_trainable({"vae": vae}, latest_checkpoint(work))
    write_loss_curve(work / LOG_FILE, work / "loss.png")
    vae.requires_grad_(False).eval()
    with torch.no_grad():  # SD's latent scale: 1 / std of the training latents
        sample, _ = images.batch(min(64, 4 * config.batch_size), torch.Generator().manual_seed(config.seed))
        latents = vae.encode(sample.to(vae.device)).latent_dist.sample(generator=torch.Generator().manual_seed(config.seed))
    vae.register_to_config(scaling_factor=round(1 / float(latents.float().std()), 5))
    psnr, recoloured = held_back_psnr(vae, images)
    return {"steps": result.step, "stopped_by": result.stopped_by, "last_loss": result.last_loss,
            "scaling_factor": vae.config.scaling_factor, "held_back_images": len(images.held_back),
            "psnr_db": psnr, "psnr_recoloured_db": recoloured}


def read_run(out: Path) -> tuple[dict[str, Any], PretrainImages]:
    """The settings of the pretrain run in ``out`` and its images, read as that run read them."""
    settings = read_json(out / SETTINGS)
    return settings, load_pretrain_images([Path(d) for d in settings["data"]], settings["resolution"],
                                          settings["include_defects"])


def held_back_psnr(vae: AutoencoderKL, images: PretrainImages) -> tuple[float | None, float | None]:
    """The autoencoder's PSNR (dB, 2 decimals) on the held-back images, and on them in the 11 other
    colourings; ``(None, None)`` without held-back images."""
    if not images.held_back:
        return None, None
    held = images.held_back_batch()
    recoloured = torch.cat([colour_variant(held, c) for c in range(1, COLOURINGS)])
    return round(_psnr(vae, held), 2), round(_psnr(vae, recoloured), 2)


def _sample(backbone: Backbone, states: torch.Tensor, uncond: torch.Tensor, seed: int) -> list[np.ndarray]:
    """One image per row of ``states`` (DDIM, 25 steps, guidance 3), each from its own generator."""
    size = backbone.unet.config.sample_size
    latents = sample_latents(backbone, states, sample_generators(seed, range(len(states))), latent_size=(size, size),
                             num_inference_steps=25, guidance_scale=3.0, uncond_hidden_states=uncond[:1])
    return to_uint8(decode_latents(backbone, latents))


def denoising_loss(pred: torch.Tensor, noise: torch.Tensor, masks: torch.Tensor | None = None,
                   defect_weight: float = 0.0) -> torch.Tensor:
    """DDPM's ε loss, the MSE over every latent; with ``defect_weight`` λ > 0 (ours) and (B, H, W) bool
    pixel ``masks``, + λ × the MSE averaged over the latent pixels a defect touches (the masks
    max-pooled to the latent grid), as ``autoencoder_loss`` weighs the defect pixels."""
    return F.mse_loss(pred, noise) + defect_term((pred - noise).pow(2), masks, defect_weight)


def _unet_stage(backbone: Backbone, images: PretrainImages, states: torch.Tensor, uncond: torch.Tensor,
                config: PretrainConfig, work: Path, budget: float | None, train_config: dict[str, Any]) -> dict[str, Any]:
    unet, vae, device = backbone.unet, backbone.vae, backbone.device
    scheduler = backbone.noise_scheduler()
    shown = states.repeat_interleave(2, 0)[:16]  # two samples per prompt

    def loss_fn(modules, step, generator):
        pixels, ids, masks = images.crops(config.batch_size, generator)
        with torch.no_grad():
            posterior = vae.encode(pixels.to(device)).latent_dist
            latents = posterior.sample(generator=generator) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, backbone.num_train_timesteps, (len(ids),), generator=generator).to(device)
        dropped = torch.rand(len(ids), generator=generator) < config.uncond_prob
        context = torch.where(dropped[:, None, None].to(states.device), uncond, states[ids]).to(device)
        pred = modules["unet"](scheduler.add_noise(latents, noise, timesteps), timesteps, encoder_hidden_states=context).sample
        return denoising_loss(pred.float(), noise, masks, config.unet_defect_weight)

    def validate(step):
        write_loss_curve(work / LOG_FILE, work / "loss.png")
        return _sample(backbone, shown, uncond, config.seed)

    result = train({"unet": unet}, loss_fn, TrainConfig(max_steps=config.max_steps, time_budget_s=budget, lr=config.unet_lr,
                                                         ema_decay=config.ema_decay, **train_config), work, validate=validate)
    checkpoint = latest_checkpoint(work)
    load_trainable({"unet": unet}, checkpoint / ("ema.safetensors" if config.ema_decay else "trainable.safetensors"))
    unet.requires_grad_(False).eval()
    write_loss_curve(work / LOG_FILE, work / "loss.png")
    return {"steps": result.step, "stopped_by": result.stopped_by, "last_loss": result.last_loss,
            "ema_decay": config.ema_decay, "samples": _sample(backbone, shown, uncond, config.seed)}


def pretrain(data: list[str | Path], out: str | Path, config: PretrainConfig, say: Say = print) -> dict[str, Any]:
    """Train a prior on the images of ``data`` into ``out`` (resumes a run there); returns the report."""
    started = time.monotonic()
    config.check()
    if config.vae_attention is None:  # resolved before it is stored: naming the size's own value resumes the same run
        config = replace(config, vae_attention=PRESETS[config.size].vae_attention)
    out, data = Path(out), [Path(d) for d in data]
    images = load_pretrain_images(data, config.resolution, config.include_defects, config.balance == "categories")
    _check_out(out)
    with folder_lock(out, "pretrain"):
        _check_settings(out, _settings(config, data))
        return _pretrain(images, out, config, say, started)


def _pretrain(images: PretrainImages, out: Path, config: PretrainConfig, say: Say, started: float) -> dict[str, Any]:
    device = resolve_device(config.device)
    work = out / "training"
    say(f"{len(images.images)} images of {', '.join(images.categories)} ({len(images.prompts)} prompts, "
        f"{images.upscaled} upscaled to {config.resolution} px); {len(images.held_back)} held back; on {device}")
    tokenizer = build_tokenizer(work / "tokenizer", images.words)
    configs = component_configs(PRESETS[config.size], config.resolution, tokenizer, config.vae_attention)
    if not (work / "text_encoder").is_dir():  # frozen: the one the UNet trains with (see the module docstring)
        _save(_build(CLIPTextModel, configs["text_encoder"], config.seed), work / "text_encoder")
    text_encoder = CLIPTextModel.from_pretrained(work / "text_encoder")
    train_config = {"checkpoint_every": config.checkpoint_every, "validate_every": config.sample_every, "seed": config.seed,
                    "device": config.device, "mixed_precision": "bf16" if device.type == "cuda" else "no"}

    def remaining(share: float = 1.0) -> float | None:
        if config.time_budget_s is None:
            return None
        return max(0.0, share * config.time_budget_s - (time.monotonic() - started))

    report = read_json(out / REPORT) if (out / REPORT).is_file() else {}
    trained = report.get("vae", {}).get("steps", -1) if (work / "vae_final").is_dir() else -1
    unet_begun = latest_checkpoint(work / "unet") is not None
    if unet_begun or trained >= config.vae_steps:  # fixed, or as long as asked
        vae = _load_vae(work / "vae_final").to(device)
        if trained < config.vae_steps:
            say(f"autoencoder: kept at its {trained} steps (not `vae_steps` {config.vae_steps}): the UNet stage has begun "
                "on its latents; give a new `out` to train a longer one")
    else:
        say(f"[1/2] autoencoder: {config.vae_steps} steps")
        vae = _build(AutoencoderKL, configs["vae"], config.seed).to(device)
        report["vae"] = _vae_stage(vae, images, config, work / "vae", remaining(config.vae_share), train_config)
        _save(vae, work / "vae_final")
        atomic_write_text(out / REPORT, json.dumps(report, indent=2))
        vae_report = report["vae"]
        say(f"autoencoder: {vae_report['steps']} steps, PSNR {vae_report['psnr_db']} dB on {len(images.held_back)} "
            f"held-back images ({vae_report['psnr_recoloured_db']} dB recoloured)")
    if config.max_steps == 0 and not unet_begun:
        say("autoencoder only (`max_steps` 0): re-run with more `vae_steps` to train it on, or with `max_steps` N "
            "to train the UNet on it")
        return _finish(report, images, out, started)
    vae.requires_grad_(False).eval()
    with torch.no_grad():
        ids = tokenizer(images.prompts + [""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        states = text_encoder.to(device)(ids.to(device))[0]
    scheduler_config = configs["scheduler"]
    unet = _build(UNet2DConditionModel, configs["unet"], config.seed + 1).to(device)
    backbone = Backbone(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler_config=scheduler_config,
                        name=str(out), device=device)
    say(f"[2/2] UNet: {config.max_steps} steps")
    unet_report = _unet_stage(backbone, images, states[:-1], states[-1:], config, work / "unet", remaining(), train_config)
    save_grid(unet_report.pop("samples"), out / "samples.png")
    write_loss_curve(work / "unet" / LOG_FILE, out / "loss.png")
    report["unet"] = unet_report
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=DDIMScheduler.from_config(scheduler_config), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(out)
    report["device"] = str(device)
    return _finish(report, images, out, started)


def _finish(report: dict[str, Any], images: PretrainImages, out: Path, started: float) -> dict[str, Any]:
    report.update({"settings": read_json(out / SETTINGS), "images": len(images.images), "upscaled": images.upscaled,
                   "prompts": images.prompts, "categories": images.categories, "defect_types": images.defect_types})
    # the file holds no wall time: a resumed run writes the bytes of an uninterrupted one
    atomic_write_text(out / REPORT, json.dumps(report, indent=2))
    return {**report, "last_run_s": round(time.monotonic() - started, 1)}
