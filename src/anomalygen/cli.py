"""Few-shot anomaly generation: learn defects from a few image + mask pairs, generate many, measure them.

Commands keep only argument parsing here; the work lives in library modules. Errors a user can
act on (``AnomalygenError``) print as one line and exit with code 2, without a traceback.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from anomalygen import network

network.quiet()  # before diffusers / transformers / peft are imported

from anomalygen import pipeline  # noqa: E402
from anomalygen.errors import AnomalygenError, DataError, OptionError  # noqa: E402
from anomalygen.io import os_error  # noqa: E402
from anomalygen.methods.base import available_methods  # noqa: E402
from anomalygen.pretrain.config import PretrainConfig  # noqa: E402

# click's plain help: rich's option tables cut long option names short on an 80-column terminal
# ("--vae-colour-aug…") and show flags with a "<bool>" value they do not take
app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0], rich_markup_mode=None)
datasets_app = typer.Typer(no_args_is_help=True, help="Inspect datasets.", rich_markup_mode=None)
app.add_typer(datasets_app, name="datasets")
console = Console(stderr=True, soft_wrap=True)  # a line stays one line: paths in it can be copied, logs grepped


# The library names options as its callers write them (``OptionError.option``, and `name` in the advice
# of any message); the flag of one is "--" + its name with dashes where the command has that flag, else
# the flag below.
OPTION_FLAGS = {
    "unet_lr": "--lr",  # pretrain
    "time_budget_s": "--time-budget", "options": "--set", "settings": "--set",
    "localization.epochs": "--epochs", "localization.samples_per_epoch": "--samples-per-epoch",
    "localization.resolution": "--resolution", "localization.base": "--base", "localization.batch_size": "--batch-size",
    "localization.protocol": "--protocol", "localization.eval_every": "--eval-every",
    "classification.epochs": "--cls-epochs", "classification.resolution": "--resolution",
    "classification.protocol": "--protocol", "classification.random_init": "--cls-random-init",
    "draem_augmentation.ratio": "--draem-ratio", "draem_augmentation.share_of": "--draem-share-of",
    "draem_augmentation.epochs": "--draem-epochs", "draem_augmentation.resolution": "--draem-resolution",
    "draem_augmentation.test": "--draem-test", "draem_augmentation.texture_source": "--draem-textures",
}
# Method options a command sets with a flag of its own (every one also with --set NAME=VALUE).
METHOD_FLAGS = {
    "fit": {"model": "--model", "max_steps": "--max-steps", "time_budget_s": "--time-budget", "device": "--device"},
    "generate": {"max_steps": "--max-steps", "time_budget_s": "--time-budget"},
}


def command_flags(command: Callable[..., Any]) -> set[str]:
    """The flags ``command`` takes, read from its typer options (``--filter/--no-filter``: both)."""
    return {flag for parameter in inspect.signature(command).parameters.values()
            for declaration in getattr(parameter.default, "param_decls", None) or ()
            for flag in declaration.split("/") if flag.startswith("--")}


def flag_of(name: str, flags: set[str]) -> str | None:
    """The flag of option ``name`` when the command has one."""
    flag = OPTION_FLAGS.get(name, "--" + name.replace("_", "-"))
    return flag if flag in flags else None


def flagged(message: str, flags: set[str]) -> str:
    """``message`` with each option its advice names as `name` called by its flag, where the command has one."""
    return re.sub(r"`([a-z][a-z0-9_.]*)`", lambda match: flag_of(match.group(1), flags) or match.group(0), message)


def worded(error: OptionError, flags: set[str], method_flags: dict[str, str]) -> str:
    """``error`` naming the command-line flag of its option: a method's option with the flag that sets
    it, if any, and ``--set``; another option by its flag when the command has one, else by its name."""
    name = error.option
    if error.method:
        return error.named(f"{name} ({method_flags[name] + ' or ' if name in method_flags else ''}--set {name}=...)")
    return error.named(flag_of(name, flags) or name)


FLAGS: contextvars.ContextVar[set[str]] = contextvars.ContextVar("FLAGS", default=set())  # the running command's


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Errors as one red line on stderr, never a traceback.

    ``AnomalygenError`` and OS errors (disk full, permission denied, ...: ``anomalygen.io.os_error``)
    exit 2 (an ``OptionError`` named by the flag that sets its option: ``worded``; the options advice names
    as `name`, here and in what the command says or warns, by their flags: ``flagged``); Ctrl-C exits 130
    with a hint that re-running resumes; any other exception is a bug: one "internal error" line,
    exit 1, and the traceback only with ``ANOMALYGEN_DEBUG=1``.
    """
    flags = command_flags(command)
    method_flags = METHOD_FLAGS.get(command.__name__, {})

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        running = FLAGS.set(flags)  # for _say / _warn / _status
        try:
            return command(*args, **kwargs)
        except OptionError as error:
            _error(flagged(worded(error, flags, method_flags), flags), 2)
        except AnomalygenError as error:
            _error(flagged(str(error), flags), 2)
        except OSError as error:
            _error(str(os_error(error)), 2)
        except KeyboardInterrupt:
            _error("interrupted; run the same command again to resume", 130)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as error:
            if os.environ.get("ANOMALYGEN_DEBUG"):
                raise
            _error(f"internal error ({type(error).__name__}: {error}); this is a bug, please report it; "
                   "set ANOMALYGEN_DEBUG=1 for the traceback", 1)
        finally:
            FLAGS.reset(running)

    return wrapper


def _error(message: str, code: int) -> None:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    sys.exit(code)


def _say(message: str) -> None:
    console.print(flagged(message, FLAGS.get()), highlight=False)


def _status(message: str) -> None:
    """What a command is doing before its first progress bar; on a terminal only (logs get the bar)."""
    if console.is_terminal:
        console.print(f"[dim]{escape(flagged(message, FLAGS.get()))}…[/dim]", highlight=False)


def _warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {flagged(message, FLAGS.get())}", highlight=False)


@app.command()
@user_errors
def generate(
    data: Path = typer.Option(..., "--data", help="Dataset root or category folder (MVTec AD / LOCO / VisA / folder)."),
    out: Path = typer.Option(..., "--out", help="Output root; samples go to OUT/<category>/."),
    num: int = typer.Option(..., "--num", help="Number of samples in the finished output."),
    method: Optional[str] = typer.Option(None, "--method", help="Method name (see `anomalygen methods`)."),
    category: Optional[str] = typer.Option(None, "--category", help="Category under a dataset root."),
    seed: int = typer.Option(0, "--seed"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="A fitted model (from `anomalygen fit`)."),
    defect_type: Optional[str] = typer.Option(None, "--defect-type", help="Generate only this defect type."),
    settings: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Method option key=value (value parsed as JSON); "
                                       "with --checkpoint only options that act at generation (steps, guidance, thresholds, ...)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing output of a different run."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Warn about bad input files and skip them."),
    filter: bool = typer.Option(True, "--filter/--no-filter", help="Redraw samples that fail the validity checks "
                                "(calibrated on the real training defects; --no-filter keeps every sample)."),
    max_attempts: int = typer.Option(pipeline.MAX_ATTEMPTS, "--max-attempts", help="With --filter: draws per sample "
                                     "at most; a sample failing all of them stops the run (what is written stays)."),
    keep_failing: bool = typer.Option(False, "--keep-failing", help="With --filter: keep a sample that failed all its "
                                      "draws (its least-failing draw, flagged in the manifest) instead of stopping."),
    give_up_after: int = typer.Option(pipeline.GIVE_UP_AFTER, "--give-up-after", help="With --filter: stop when the "
                                      "first N draws all fail (a broken or untrained model); 0: never."),
    processes: int = typer.Option(1, "--processes", help="Shard the samples over N processes (one per GPU; "
                                  "the same output as one process)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="A method that must train first (no --checkpoint): "
                                            "its training steps at most (as `fit`)."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="A method that must train first: stop "
                                                "training after MINUTES (as `fit`)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the UNet on CUDA (diffusion methods; "
                                 "its compile time is printed once)."),
    with_good: bool = typer.Option(False, "--with-good", help="Also copy the real good images to train/good and "
                                   "test/good: OUT reads as an MVTec AD dataset (anomalib's MVTecAD)."),
) -> None:
    """Generate NUM defect image + mask pairs; re-running resumes an interrupted run."""
    options = pipeline.parse_settings(settings)
    options.update({key: value for key, value in {"max_steps": max_steps, "time_budget_s": None if time_budget is None
                                                   else time_budget * 60}.items() if value is not None})
    if checkpoint is None:
        network.offline_unless_reachable([options.get("model")])
    result = pipeline.generate(
        method, data, out, num, category=category, seed=seed, checkpoint=checkpoint,
        defect_type=defect_type, options=options, overwrite=overwrite,
        skip_bad=skip_bad, filter=filter, max_attempts=max_attempts, keep_failing=keep_failing,
        give_up_after=give_up_after, processes=processes, compile=compile, with_good=with_good,
        warn=_warn, say=_say, status=_status, console=console,
    )
    masks = "".join(f", {n} {source}" for source, n in sorted(result.mask_sources.items()))
    console.print(f"{result.method}: {result.total} samples in {result.out} ({result.written} new{masks})", highlight=False)
    if filter and result.written:
        checks = ", ".join(f"{check} {n}" for check, n in sorted(result.rejected.items())) or "none"
        types = ", ".join(f"{t} {result.redrawn.get(t, 0)}/{n}" for t, n in sorted(result.written_types.items()))
        console.print(f"filter: {sum(result.redrawn.values())} of {result.written} new samples redrawn ({types}), "
                      f"{result.invalid} kept failing; rejected draws: {checks}", highlight=False)
    if result.total:
        from anomalygen.visualize import preview_path  # imported by the pipeline already, which wrote it

        where = f" --category {result.category}" if category else ""
        console.print(f"preview: {preview_path(result.out)}\nnext:\n"
                      f"  anomalygen evaluate --generated {out} --data {data}{where} --preset quick   "
                      "# downstream U-Net + ResNet-34 (--preset paper: the papers' settings, for a GPU)\n"
                      f"  anomalib: MVTecAD(root={out}, category={result.category}) after --with-good", highlight=False)


@app.command()
@user_errors
def fit(
    method: str = typer.Option(..., "--method", help="Method name (see `anomalygen methods`)."),
    data: Path = typer.Option(..., "--data", help="Dataset root or category folder."),
    out: Path = typer.Option(..., "--out", help="Folder to save the fitted model in."),
    category: Optional[str] = typer.Option(None, "--category"),
    model: Optional[str] = typer.Option(None, "--model", help="Base model: hub id or local folder."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps"),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="Stop training after MINUTES."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ..."),
    settings: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Method option key=value (value parsed as JSON)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Warn about bad input files and skip them."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Save into an --out that holds files anomalygen did not "
                                   "write (files named as the model's are replaced, others kept)."),
) -> None:
    """Fit METHOD on the paper split's training images of a category and save the model."""
    given = {"model": model, "max_steps": max_steps, "device": device,
             "time_budget_s": None if time_budget is None else time_budget * 60}
    options = {key: value for key, value in given.items() if value is not None}
    options.update(pipeline.parse_settings(settings))
    network.offline_unless_reachable([options.get("model")])
    saved = pipeline.fit(method, data, out, category=category, options=options, skip_bad=skip_bad, warn=_warn,
                         overwrite=overwrite)
    if pipeline.launched()[0] == 0:  # the process that saved
        console.print(f"{method}: model saved in {saved}", highlight=False)


@app.command("pretrain")
@user_errors
def pretrain_command(
    data: list[Path] = typer.Option(..., "--data", metavar="DIR", help="Dataset root or category folder (repeat for more); its train/good images."),
    out: Path = typer.Option(..., "--out", help="Folder for the model (diffusers format, for --model); re-running resumes."),
    resolution: int = typer.Option(PretrainConfig.resolution, "--resolution", help="Training size in px: 64, 128 or 256 (any multiple of 32 up to 512)."),
    size: str = typer.Option(PretrainConfig.size, "--size", help="Model size: tiny (tests), small (CPU) or base (GPU)."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="Stop this run after MINUTES (re-run to go on)."),
    vae_share: float = typer.Option(PretrainConfig.vae_share, "--vae-share", help="Share of --time-budget the autoencoder may take (it trains first)."),
    max_steps: int = typer.Option(PretrainConfig.max_steps, "--max-steps", help="UNet training steps; 0: the autoencoder only (re-run to go on)."),
    vae_steps: int = typer.Option(PretrainConfig.vae_steps, "--vae-steps", help="Autoencoder training steps (trained first)."),
    batch_size: int = typer.Option(PretrainConfig.batch_size, "--batch-size"),
    lr: float = typer.Option(PretrainConfig.unet_lr, "--lr", help="The UNet's AdamW learning rate."),
    vae_lr: float = typer.Option(PretrainConfig.vae_lr, "--vae-lr", help="The autoencoder's AdamW learning rate."),
    include_defects: bool = typer.Option(PretrainConfig.include_defects, "--include-defects", help="Also train on the training third of each defect type."),
    vae_attention: Optional[bool] = typer.Option(
        None, "--vae-attention/--no-vae-attention", help="The autoencoder's mid-block self-attention (default: on, as LDM's, "
        "except --size tiny); its effect on the samples' colours is measured in benchmarks/RESULTS.md."),
    balance: str = typer.Option(PretrainConfig.balance, "--balance", help="categories: each category as often, whatever its image count; images: each image as often."),
    vae_colour_augment: float = typer.Option(
        PretrainConfig.vae_colour_augment, "--vae-colour-augment", help="Share of autoencoder crops recoloured (channel orders, inversion) so it can "
        "encode colours your good images lack, as defects have; 0: none."),
    vae_defect_weight: float = typer.Option(
        PretrainConfig.vae_defect_weight, "--vae-defect-weight", help="With --include-defects: add this many times the "
        "autoencoder's L1 over the defect pixels (their masks), so it keeps thin or small defects; 0: LDM's loss."),
    unet_defect_weight: float = typer.Option(
        PretrainConfig.unet_defect_weight, "--unet-defect-weight", help="With --include-defects: add this many times the "
        "UNet's loss over the latents a defect touches; 0: DDPM's loss."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ..."),
    seed: int = typer.Option(PretrainConfig.seed, "--seed"),
) -> None:
    """Train a base diffusion model from scratch on your own images (air-gapped: nothing is downloaded)."""
    from anomalygen.pretrain import pretrain

    if time_budget is not None and time_budget <= 0:  # in the flag's unit (the config's is seconds)
        raise OptionError("time_budget", f"{time_budget:g}: must be more than 0 minutes")
    config = PretrainConfig(resolution=resolution, size=size, max_steps=max_steps, vae_steps=vae_steps, batch_size=batch_size,
                            unet_lr=lr, vae_lr=vae_lr, include_defects=include_defects, balance=balance,
                            vae_attention=vae_attention,
                            vae_colour_augment=vae_colour_augment, vae_defect_weight=vae_defect_weight,
                            unet_defect_weight=unet_defect_weight, vae_share=vae_share, device=device, seed=seed,
                            time_budget_s=None if time_budget is None else time_budget * 60)
    report = pretrain(data, out, config, say=_say)
    vae = f"autoencoder {report['vae']['steps']} steps, PSNR {report['vae']['psnr_db']} dB"
    if "unet" in report:
        console.print(f"model saved in {out} ({vae}, UNet {report['unet']['steps']} steps); use it with --model {out}",
                      highlight=False)
    else:
        console.print(f"{vae}; no model yet in {out}", highlight=False)


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("anomalygen-demo"), "--out", help="Folder for the demo data, samples and index.html."),
    methods: list[str] = typer.Option([], "--methods", metavar="NAME", help="Methods to run (repeat or comma-separate); default: the model-free ones."),
    num: int = typer.Option(6, "--num", help="Samples per method and category."),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into an --out holding files anomalygen did not write."),
) -> None:
    """Build the demo dataset, run the methods on it and write an HTML page of sample grids."""
    from anomalygen.demo import run_demo

    chosen = [name for entry in methods for name in entry.split(",") if name] or None
    page = run_demo(out, chosen, num=num, seed=seed, console=console, warn=_warn, overwrite=overwrite)
    console.print(f"open {page}", highlight=False)


@app.command("methods")
def list_methods() -> None:
    """List the generation methods: kind, whether a base model is needed, paper, default base model."""
    table = Table(title="anomalygen methods (use with --method NAME)")
    for column in ("method", "kind", "base model", "paper", "default base"):
        table.add_column(column, overflow="fold")
    for name, about in method_facts().items():
        table.add_row(name, about["kind"], "needed" if about["needs_base"] else "none", about["paper"], about["default_base"])
    Console(width=max(Console().width, 150)).print(table)


def method_facts() -> dict[str, dict[str, Any]]:
    """Per method: its kind, whether it needs a base diffusion model, its paper (from its module's
    docstring) and the base model it loads when --model is not given."""
    import re

    from anomalygen.diffusion.backbone import LDM_MODEL, default_model
    from anomalygen.methods.base import get_method

    facts = {}
    for name in available_methods():
        generator = get_method(name)
        needs_base = "model" in generator.OPTIONS
        doc = " ".join((sys.modules[generator.__module__].__doc__ or "").split())
        paper = re.search(r"\(([^()]*?et al\.[^()]*?)(?:, Eq\.|\))", doc)  # "(Authors et al., ..., Eq. 2: ...)"
        kind = "diffusion, learns from the defects" if needs_base else (
            "model-free, learns its crops from the defects" if generator.needs_fit else "model-free, no learning")
        # anomalydiffusion's default base is LDM text2im, as its paper (methods/anomalydiffusion/generator.py)
        base = (default_model(LDM_MODEL) if name == "anomalydiffusion" else default_model()) if needs_base else "—"
        facts[name] = {"kind": kind, "needs_base": needs_base, "paper": paper.group(1) if paper else "—", "default_base": base}
    return facts


@datasets_app.command("info")
@user_errors
def datasets_info(
    root: Path = typer.Argument(..., help="Dataset root or category folder."),
    category: Optional[str] = typer.Option(None, "--category"),
) -> None:
    """Counts per split and defect type, image sizes and problems found."""
    from anomalygen.data import dataset_info

    info = dataset_info(root, category)
    output = Console()
    output.print(info_table(info))
    for name, summary in info["categories"].items():
        output.print(f"layout ({name}): {summary['layout']}, because {summary['layout_reason']}", highlight=False, soft_wrap=True)
        for problem in summary["problems"]:
            output.print(f"[yellow]problem[/yellow] ({name}): {problem}", highlight=False, soft_wrap=True)


def info_table(info: dict[str, Any]) -> Table:
    """A rich table of ``dataset_info``: one row per category and split / defect type."""
    table = Table(title=f"dataset {info['root']}")
    for column in ("category", "layout", "split / type", "images", "image sizes (WxH: n)", "problems"):
        table.add_column(column, justify="right" if column in ("images", "problems") else "left")
    for name, summary in info["categories"].items():
        sizes = ", ".join(f"{size}: {n}" for size, n in list(summary["image_sizes"].items())[:3])
        groups = {"train/good": summary["train_good"], "test/good": summary["test_good"]}
        groups.update({f"test/{t}": n for t, n in summary["defects"].items()})
        for row, (group, count) in enumerate(groups.items()):
            first = row == 0
            table.add_row(name if first else "", summary["layout"] if first else "", group, str(count),
                          sizes if first else "", str(len(summary["problems"])) if first else "")
        table.add_section()
    return table


def _evaluation_options(
    *, metrics: Optional[str], protocol: str, device: Optional[str], epochs: Optional[int], samples_per_epoch: Optional[int],
    resolution: Optional[int], base: Optional[int], batch_size: Optional[int], eval_every: int, cls_epochs: Optional[int],
    preset: str, cls_random_init: bool, inception_weights: Optional[Path],
    lpips_net: str, seed: int, skip_bad: bool, draem_ratio: float, draem_share_of: str, draem_epochs: Optional[int],
    draem_resolution: Optional[int], draem_test: str, draem_textures: str, draem_baseline: bool,
) -> dict[str, Any]:
    """The evaluation keyword arguments; the configs check every value here, before anything is written."""
    from anomalygen.evaluation.classification import ClassificationConfig
    from anomalygen.evaluation.draem_augmentation import DraemAugmentationConfig
    from anomalygen.evaluation.localization import LocalizationConfig
    from anomalygen.evaluation.presets import apply_preset

    sizes = apply_preset(preset, {"epochs": epochs, "samples_per_epoch": samples_per_epoch, "resolution": resolution,
                                  "base": base, "batch_size": batch_size, "cls_epochs": cls_epochs})
    epochs, samples_per_epoch, resolution, base, batch_size, cls_epochs = sizes.values()
    return {
        # None = every metric, skipping (with a note) those whose weights are missing offline.
        "metrics": None if metrics is None else [name.strip() for name in metrics.split(",") if name.strip()],
        "device": device,
        "localization": LocalizationConfig(epochs=epochs, samples_per_epoch=samples_per_epoch, resolution=resolution,
                                           base=base, batch_size=batch_size, protocol=protocol, eval_every=eval_every,
                                           seed=seed),
        "classification": ClassificationConfig(epochs=cls_epochs, resolution=resolution, seed=seed, protocol=protocol,
                                               random_init=cls_random_init),
        "draem": DraemAugmentationConfig(ratio=draem_ratio, share_of=draem_share_of, epochs=draem_epochs, resolution=draem_resolution,
                                         test=draem_test, texture_source=draem_textures, baseline=draem_baseline,
                                         seed=seed),
        "inception_weights": None if inception_weights is None else str(inception_weights),
        "lpips_net": lpips_net,
        "preset": preset,
        "skip_bad": skip_bad,
        "seed": seed,
    }


# name: (type, option) of the options `evaluate` and `benchmark` share (added by ``evaluation_options``)
EVAL_OPTIONS: dict[str, tuple[Any, Any]] = {
    "metrics": (Optional[str], typer.Option(None, "--metrics", help="Comma-separated metrics from is, ic-lpips, localization, "
                                            "classification, draem-augmentation (default: all but draem-augmentation; those whose "
                                            "weights are missing offline are skipped with a note, while a metric named here without "
                                            "its weights is an error).")),
    "protocol": (str, typer.Option("both", "--protocol", help="paper (the official scripts' best test epoch: U-Net by the sum "
                                   "image AUROC + pixel AUROC + pixel AP + PRO, ResNet-34 by accuracy), clean (last epoch) or both.")),
    "device": (Optional[str], typer.Option(None, "--device", help="cuda or cpu (default: cuda when available).")),
    "preset": (str, typer.Option("paper", "--preset", help="paper: the papers' settings (200 epochs x 500 samples, 256 px, "
                                 "base 64, ResNet 30 epochs; hours on a GPU, days on a CPU); quick: 10 x 200, 128 px, base 16, "
                                 "ResNet 5 epochs (minutes on a CPU; figures that rank little). Options given win.")),
    "epochs": (Optional[int], typer.Option(None, "--epochs", help="U-Net epochs (paper: 200, quick: 10).")),
    "samples_per_epoch": (Optional[int], typer.Option(None, "--samples-per-epoch", help="U-Net samples per epoch (paper: 500, quick: 200).")),
    "resolution": (Optional[int], typer.Option(None, "--resolution", help="U-Net / ResNet input size in px, multiple of 32 (paper: 256, quick: 128).")),
    "base": (Optional[int], typer.Option(None, "--base", help="U-Net base width (paper: 64, quick: 16).")),
    "batch_size": (Optional[int], typer.Option(None, "--batch-size", help="U-Net batch size (8).")),
    "eval_every": (int, typer.Option(1, "--eval-every", help="paper protocol: test every N epochs (official: 1).")),
    "cls_epochs": (Optional[int], typer.Option(None, "--cls-epochs", help="ResNet-34 epochs (paper: 30, quick: 5).")),
    "cls_random_init": (bool, typer.Option(False, "--cls-random-init", help="Train the ResNet-34 from random init "
                                           "(without this, its ImageNet weights must be in the torch hub cache; papers: ImageNet).")),
    "inception_weights": (Optional[Path], typer.Option(None, "--inception-weights", help="Inception weights file (else env / torch hub "
                                                       "cache); read without pickle code.")),
    "lpips_net": (str, typer.Option("vgg", "--lpips-net", help="IC-LPIPS backbone: vgg or alex.")),
    "seed": (int, typer.Option(0, "--seed")),
    "skip_bad": (bool, typer.Option(False, "--skip-bad", help="Warn about bad real files (e.g. empty masks) and leave them out.")),
    "draem_ratio": (float, typer.Option(0.3, "--draem-ratio", help="draem-augmentation: share of the training samples (or, "
                                        "with --draem-share-of anomalies, of DRAEM's simulated anomalies) that are generated "
                                        "pairs (CAGen: 0.3).")),
    "draem_share_of": (str, typer.Option("training_set", "--draem-share-of", help="draem-augmentation: training_set (CAGen's "
                                         "'30% of the training set') or anomalies (ours: of DRAEM's simulated anomalies).")),
    "draem_epochs": (Optional[int], typer.Option(None, "--draem-epochs", help="draem-augmentation: DRAEM epochs (default: 700 on cuda "
                                                 "as DRAEM, 20 on cpu, labelled reduced).")),
    "draem_resolution": (Optional[int], typer.Option(None, "--draem-resolution", help="draem-augmentation: px (default: 256 on cuda, "
                                                     "64 on cpu; network widths follow: DRAEM's on cuda, 1/8 on cpu).")),
    "draem_test": (str, typer.Option("clean", "--draem-test", help="draem-augmentation test set: clean (the generator's "
                                     "training defects left out) or full (every real test image, as CAGen's paper).")),
    "draem_textures": (str, typer.Option("skimage", "--draem-textures", help="draem-augmentation: DRAEM's anomaly texture "
                                         "folder (DRAEM uses DTD) or skimage (bundled textures).")),
    "draem_baseline": (bool, typer.Option(True, "--draem-baseline/--no-draem-baseline", help="draem-augmentation: also "
                                          "train DRAEM alone (same seed) for the comparison.")),
}


def evaluation_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``command`` the ``EVAL_OPTIONS``; it receives them checked, as one dict ``evaluation``
    (``_evaluation_options``: keyword arguments of ``evaluation.run.evaluate``, seed included)."""
    signature = inspect.signature(command)
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
              for name, (kind, option) in EVAL_OPTIONS.items()]
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values() if p.name != "evaluation"]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        evaluation = _evaluation_options(**{name: kwargs.pop(name) for name in EVAL_OPTIONS})
        return command(**kwargs, evaluation=evaluation)

    wrapper.__signature__ = signature.replace(parameters=own + shared)  # what typer reads
    return wrapper


@app.command()
@user_errors
@evaluation_options
def evaluate(
    generated: Path = typer.Option(..., "--generated", help="Generated output root (OUT/<category>/test/<type>/...)."),
    data: Path = typer.Option(..., "--data", help="The real dataset root or category folder."),
    category: Optional[str] = typer.Option(None, "--category"),
    report_dir: Optional[Path] = typer.Option(None, "--report-dir", help="Where to write report.json/html (default OUT/<category>)."),
    *,
    evaluation: dict[str, Any],  # the EVAL_OPTIONS (evaluation_options)
) -> None:
    """Evaluate generated defects: IS, IC-LPIPS, downstream U-Net localisation, ResNet-34 classification."""
    from anomalygen.evaluation.run import evaluate as run_evaluation

    evaluation.pop("preset")
    try:
        report = run_evaluation(generated, data, category=category, out=report_dir, say=_say, warn=_warn, **evaluation)
    except DataError as error:
        if evaluation["skip_bad"] or error.path is None or not error.path.resolve().is_relative_to(data.resolve()):
            raise
        raise AnomalygenError(f"{error}; --skip-bad leaves bad real files out (each named in a warning and the report)") from None
    for note in report["notes"]:
        if not note.startswith(SKIPPED):  # warned about when the data were read
            _warn(note)
    Console(soft_wrap=False).print(report_table(report))
    console.print(f"report: {' and '.join(report['files'])}", highlight=False)


@app.command()
@user_errors
@evaluation_options
def benchmark(
    data: Path = typer.Option(..., "--data", help="The real dataset root or category folder."),
    methods: str = typer.Option("cutpaste,croppaste,draem", "--methods", help="Comma-separated method names."),
    out: Path = typer.Option(..., "--out", help="Benchmark folder (samples, reports, comparison.md/html)."),
    category: Optional[str] = typer.Option(None, "--category", help="One category (default: every category)."),
    num_per_type: Optional[int] = typer.Option(None, "--num-per-type", help="Generated samples per defect type "
                                               "(paper preset: 500, quick: 100)."),
    settings: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Method option key=value for every method, or "
                                       "METHOD.key=value for one (e.g. anomalydiffusion.model=tiny)."),
    max_attempts: int = typer.Option(pipeline.MAX_ATTEMPTS, "--max-attempts", help="Draws per sample at most "
                                     "(validity filter); a sample failing all of them stops the benchmark."),
    keep_failing: bool = typer.Option(False, "--keep-failing", help="Keep samples that fail the validity checks in "
                                      "all --max-attempts draws (flagged) instead of stopping."),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="Also train the localisation U-Net on good "
                                   "images only and on the real training defects (augmented): the rows generated data "
                                   "must beat."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into an --out holding files anomalygen did not write."),
    *,
    evaluation: dict[str, Any],  # the EVAL_OPTIONS (evaluation_options)
) -> None:
    """Generate with each method, evaluate each, and write one comparison table (Markdown + HTML)."""
    from anomalygen.benchmark import benchmark as run_benchmark

    from anomalygen.evaluation.presets import PRESETS

    chosen = [name.strip() for name in methods.split(",") if name.strip()]
    parsed = pipeline.parse_settings(settings)
    network.offline_unless_reachable([value for key, value in parsed.items() if key.split(".")[-1] == "model"] or [None])
    preset = evaluation.pop("preset")
    num_per_type = PRESETS[preset]["num_per_type"] if num_per_type is None else num_per_type
    result = run_benchmark(data, chosen, out, category=category, num_per_type=num_per_type, say=_say, warn=_warn,
                           settings=pipeline.parse_settings(settings), max_attempts=max_attempts,
                           keep_failing=keep_failing, with_baselines=baselines, overwrite=overwrite, **evaluation)
    Console(soft_wrap=False).print(benchmark_table(result["reports"]))
    console.print(f"comparison: {out / 'comparison.html'} and .md ({', '.join(f'{m} {t:.0f} s' for m, t in result['timings_s'].items())})",
                  highlight=False)


SKIPPED = "skipped bad real file: "  # evaluation.run's note of a file --skip-bad left out
KEY_FIGURES = {"pixel_ap": "pixel AP", "pixel_au_pro": "AU-PRO", "pixel_auroc": "pixel AUROC", "image_auroc": "image AUROC"}


def _figure(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "—" if value is None else str(value)


def report_table(report: dict[str, Any]) -> Table:
    """The key figures of an evaluation report: localisation per protocol, classification, IS / IC-LPIPS."""
    table = Table(title=f"evaluation: {report['category']} ({sum(report['generated_counts'].values())} generated pairs)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    loc = report.get("localization", {})
    for protocol in ("clean", "paper_selected"):
        for key, label in KEY_FIGURES.items():
            if protocol in loc:
                table.add_row(f"U-Net {label} ({'last epoch' if protocol == 'clean' else 'best test epoch'})",
                              _figure(loc[protocol].get(key)))
    for section, key, label in (("classification", "accuracy", "ResNet-34 accuracy"), ("inception_score", "mean", "IS"),
                                ("ic_lpips", "mean", "IC-LPIPS")):
        part = report.get(section, {})
        table.add_row(label, "skipped" if "skipped" in part else _figure(part.get(key)))
    rates = report.get("validity", {}).get("all")
    if rates:
        table.add_row("first draws rejected by the validity checks", f"{rates['rejected_first']:.0%}")
    return table


def benchmark_table(reports: dict[str, dict[str, dict[str, Any]]]) -> Table:
    """One row per category and method: the last-epoch U-Net figures and the ResNet-34 accuracy."""
    table = Table(title="benchmark (U-Net: last epoch)")
    for column in ("category", "method", *KEY_FIGURES.values(), "accuracy"):
        table.add_column(column, justify="left" if column in ("category", "method") else "right")
    for name, by_method in reports.items():
        for method, report in by_method.items():
            clean = report.get("localization", {}).get("clean", {})
            cls = report.get("classification", {})
            table.add_row(name, method, *(_figure(clean.get(key)) for key in KEY_FIGURES),
                          "skipped" if "skipped" in cls else _figure(cls.get("accuracy")))
    return table


def _usage_errors() -> tuple[type[Exception], ...]:
    """click's ``UsageError`` and, where typer vendors its own click, typer's."""
    classes: list[type[Exception]] = [click.UsageError]
    try:
        from typer._click.exceptions import UsageError
    except ImportError:
        return tuple(classes)
    return (*classes, UsageError)


def main() -> None:
    """The ``anomalygen`` command. typer's usage errors (an unknown or missing option, a value of
    the wrong type, an unknown command) become one ``error:`` line, exit 2, like every other user
    error; ``--help`` and the help shown for a bare ``anomalygen`` are typer's."""
    try:
        code = app(standalone_mode=False)
    except _usage_errors() as error:
        if type(error).__name__ == "NoArgsIsHelpError":  # the help has been shown
            sys.exit(2)
        command = error.ctx.command_path if getattr(error, "ctx", None) else "anomalygen"
        _error(f"{error.format_message()} (see `{command} --help`)", 2)
    finally:
        _close_process_group()
    sys.exit(code if isinstance(code, int) else 0)


@app.callback()
@user_errors
def _one_process_unless_fit(context: typer.Context) -> None:
    processes = pipeline.launched()[1]
    if processes > 1 and context.invoked_subcommand != "fit":
        _error(f"`anomalygen {context.invoked_subcommand}` runs as one process, not {processes} (only `fit` trains "
               "across processes); launch it without accelerate/torchrun" + (
                   ", with --processes N to shard generation" if context.invoked_subcommand == "generate" else ""), 2)


def _close_process_group() -> None:
    """Close the process group a multi-process ``fit`` opened (accelerate does not): left to the
    interpreter's teardown, gloo can abort the process ("terminate called without an active exception")."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


if __name__ == "__main__":
    main()
