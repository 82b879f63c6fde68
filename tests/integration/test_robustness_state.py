"""Robustness harness, state and options side (issue 11, items 6, 7, 10): malformed `--set` values
and tampered saved models through the real CLI (`cli_harness.run_cli`). Each case: exit 2, no traceback,
one error line naming the option or the file, the data and model folders byte-identical after the
run, nothing written to the output folder.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

import anomalygen
from anomalygen.data.demo import make_demo_dataset
from anomalygen.methods.base import METHODS

from tests.helpers.cli_harness import CASES, assert_unchanged, assert_user_error, run_cli, snapshot

ENV = {"PYTHONPATH": str(Path(anomalygen.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
TINY = {"model": "tiny", "device": "cpu", "resolution": 32, "batch_size": 2, "max_steps": 1,
        "num_inference_steps": 2, "checkpoint_every": 0}
AD_TINY = {**TINY, "mask_source": "augment", "spatial_encoder": "tiny", "num_anomaly_tokens": 2}

# id: (command and its options, fragments the error line must hold)
OPTION_CASES: dict[str, tuple[list[str], list[str]]] = {
    "draem-ops-not-int": (["generate", "--method", "draem", "--set", "ops=abc"], ["ops", "'abc'", "integer"]),
    "draem-ops-bool": (["generate", "--method", "draem", "--set", "ops=true"], ["ops", "integer"]),
    "draem-max-exp-range": (["generate", "--method", "draem", "--set", "max_exp=99"], ["max_exp", "<= 10"]),
    "draem-texture-empty": (["generate", "--method", "draem", "--set", 'texture_source=""'], ["texture_source", "non-empty"]),
    "draem-beta-torn-json": (["generate", "--method", "draem", "--set", "beta=[0.1,"], ["beta", "[min, max]"]),
    "draem-threshold-list": (["generate", "--method", "draem", "--set", "threshold=[1,2]"], ["threshold", "number"]),
    "draem-exp-order": (["generate", "--method", "draem", "--set", "min_exp=6", "--set", "max_exp=2"], ["min_exp", "max_exp"]),
    "croppaste-scale-negative": (["generate", "--method", "croppaste", "--set", "scale=[-1,-2]"], ["scale", "min <= max"]),
    "croppaste-flip-not-bool": (["generate", "--method", "croppaste", "--set", "flip=maybe"], ["flip", "true or false"]),
    "croppaste-min-area-zero": (["generate", "--method", "croppaste", "--set", "min_area=0"], ["min_area", ">= 1"]),
    "cutpaste-unknown-variant": (["generate", "--method", "cutpaste", "--set", 'variants=["patch","blob"]'], ["variants", "scar"]),
    "cutpaste-area-reversed": (["generate", "--method", "cutpaste", "--set", "area=[0.5,0.1]"], ["area", "min <= max"]),
    "cutpaste-area-nan": (["generate", "--method", "cutpaste", "--set", "area=[NaN,0.1]"], ["area"]),
    "cutpaste-foreground": (["generate", "--method", "cutpaste", "--set", "foreground=sideways"], ["foreground", "texture"]),
    "cutpaste-unknown-option": (["generate", "--method", "cutpaste", "--set", "colour=red"], ["colour", "known:"]),
    "anomalydiffusion-device": (["fit", "--method", "anomalydiffusion", "--model", "tiny", "--device", "quantum"],
                                ["device", "--device", "quantum", "cpu"]),
    "anomalydiffusion-precision": (["fit", "--method", "anomalydiffusion", "--model", "tiny", "--set", "mixed_precision=fp8"],
                                   ["mixed_precision", "bf16"]),
    "cagen-prompt": (["fit", "--method", "cagen", "--model", "tiny", "--set", "prompt=a photo"], ["prompt", "{defect}"]),
    "anomalyxfusion-tokens-zero": (["fit", "--method", "anomalyxfusion", "--model", "tiny", "--set", "tokens=0"], ["tokens", ">= 1"]),
    "anomalyxfusion-captions-missing": (["fit", "--method", "anomalyxfusion", "--set", "captions=absent/captions.json"],
                                        ["absent/captions.json", "not found"]),
    "dualanodiff-rank-zero": (["fit", "--method", "dualanodiff", "--model", "tiny", "--set", "rank=0"], ["rank", ">= 1"]),
    "dualanodiff-mask-source": (["generate", "--method", "dualanodiff", "--set", "mask_source=u2net"],
                                ["mask_source", "u2net_weights"]),  # the official masks need U2-Net weights
    "textual-inversion-prompt": (["fit", "--method", "textual-inversion", "--set", "prompt=a photo"], ["prompt", "{}"]),
    "textual-inversion-device": (["fit", "--method", "textual-inversion", "--device", "cuda:7"], ["device", "cuda:7"]),
    # size-like options bounded by what a method can use, the limit in the line (before: the allocator's
    # out-of-memory error, a scheduler's internal error after run.json was written, or minutes of allocating)
    "cagen-resolution-huge": (["fit", "--method", "cagen", "--model", "tiny", "--set", "resolution=100000"],
                              ["resolution", "100000", "<= 2048"]),
    "textual-inversion-steps-past-the-schedule": (["generate", "--method", "textual-inversion", "--set", 'model="tiny"',
                                                   "--set", "num_inference_steps=5000"], ["num_inference_steps", "<= 1000"]),
    "anomalydiffusion-mask-steps-past-the-schedule": (["fit", "--method", "anomalydiffusion", "--model", "tiny", "--set",
                                                       "mask_inference_steps=1001"], ["mask_inference_steps", "<= 1000"]),
    "dualanodiff-rank-huge": (["fit", "--method", "dualanodiff", "--model", "tiny", "--set", "rank=20000"], ["rank", "<= 320"]),
    "anomalydiffusion-batch-huge": (["fit", "--method", "anomalydiffusion", "--model", "tiny", "--set", "batch_size=100000"],
                                    ["batch_size", "<= 256"]),
    "anomalyxfusion-generate-batch-huge": (["generate", "--method", "anomalyxfusion", "--set", 'model="tiny"', "--set",
                                            "generate_batch_size=1000000"], ["generate_batch_size", "<= 256"]),
    "anomalyxfusion-mask-embedding-huge": (["fit", "--method", "anomalyxfusion", "--model", "tiny", "--set",
                                            "mask_embedding=100000"], ["mask_embedding", "<= 4096"]),
}


def _write_json(path: Path, value) -> None:
    path.write_text(value if isinstance(value, str) else json.dumps(value))


def _edit_json(path: Path, change: Callable) -> None:
    value = json.loads(path.read_text())
    change(value)
    _write_json(path, value)


def _symlink_crop_out(model: Path, data: Path) -> None:
    crop = model / "crops" / "0000.png"
    crop.unlink()
    crop.symlink_to(next((data / "fabric" / "train" / "good").iterdir()))


# id: (model, file named in the error, tamper(model folder, data root))
TAMPER_CASES: dict[str, tuple[str, str, Callable[[Path, Path], None]]] = {
    "generator-json-torn": ("croppaste", "generator.json", lambda m, d: _write_json(m / "generator.json", '{"method": "crop')),
    "generator-json-list": ("croppaste", "generator.json", lambda m, d: _write_json(m / "generator.json", [1, 2])),
    "generator-json-binary": ("croppaste", "generator.json", lambda m, d: (m / "generator.json").write_bytes(b"\xff\xfe\x00")),
    "generator-json-unknown-method": ("croppaste", "generator.json",
                                      lambda m, d: _edit_json(m / "generator.json", lambda v: v.update(method="magic"))),
    "generator-json-no-method": ("croppaste", "generator.json",
                                 lambda m, d: _edit_json(m / "generator.json", lambda v: v.pop("method"))),
    "generator-json-bad-option": ("croppaste", "generator.json",
                                  lambda m, d: _edit_json(m / "generator.json", lambda v: v["options"].update(scale="x"))),
    "generator-json-options-not-object": ("croppaste", "generator.json",
                                          lambda m, d: _edit_json(m / "generator.json", lambda v: v.update(options=[1]))),
    "generator-json-defect-types": ("croppaste", "generator.json",
                                    lambda m, d: _edit_json(m / "generator.json", lambda v: v.update(defect_types=7))),
    "crops-json-torn": ("croppaste", "crops.json", lambda m, d: _write_json(m / "crops.json", "[{")),
    "crops-json-object": ("croppaste", "crops.json", lambda m, d: _write_json(m / "crops.json", {"a": 1})),
    "crops-json-entry-not-object": ("croppaste", "crops.json", lambda m, d: _write_json(m / "crops.json", ["crops/0000.png"])),
    "crops-json-missing-mask": ("croppaste", "crops.json", lambda m, d: _edit_json(m / "crops.json", lambda v: v[0].pop("mask"))),
    "crops-json-source-shape": ("croppaste", "crops.json",
                                lambda m, d: _edit_json(m / "crops.json", lambda v: v[0].update(source_shape="big"))),
    "crops-json-parent-path": ("croppaste", "crops.json", lambda m, d: _edit_json(  # an image that exists
        m / "crops.json", lambda v: v[0].update(image=os.path.relpath(d / "fabric" / "train" / "good" / "000.png", m)))),
    "crops-json-absolute-path": ("croppaste", "crops.json", lambda m, d: _edit_json(
        m / "crops.json", lambda v: v[0].update(image=str(d / "fabric" / "train" / "good" / "000.png")))),
    "crops-json-dotted-path": ("croppaste", "crops.json",
                               lambda m, d: _edit_json(m / "crops.json", lambda v: v[0].update(mask="crops/../crops/0000_mask.png"))),
    "crops-symlink-out": ("croppaste", "crops.json", _symlink_crop_out),
    "anomalydiffusion-json-torn": ("anomalydiffusion", "anomalydiffusion.json",
                                   lambda m, d: _write_json(m / "anomalydiffusion.json", "{")),
    "anomalydiffusion-json-mask-path": ("anomalydiffusion", "anomalydiffusion.json", lambda m, d: _edit_json(
        m / "anomalydiffusion.json", lambda v: v["training_masks"]["cut"].__setitem__(0, "../../../etc/passwd"))),
    "anomalydiffusion-weights-truncated": ("anomalydiffusion", "anomalydiffusion.safetensors", lambda m, d: (
        m / "anomalydiffusion.safetensors").write_bytes((m / "anomalydiffusion.safetensors").read_bytes()[:100])),
    "dualanodiff-json-torn": ("dualanodiff", "dualanodiff.json", lambda m, d: _write_json(m / "dualanodiff.json", "{")),
    "dualanodiff-json-type-path": ("dualanodiff", "dualanodiff.json", lambda m, d: _edit_json(
        m / "dualanodiff.json", lambda v: v["types"].__setitem__("cut", "../../elsewhere"))),
    "dualanodiff-json-sizes": ("dualanodiff", "dualanodiff.json",
                               lambda m, d: _edit_json(m / "dualanodiff.json", lambda v: v["sizes"].__setitem__("cut", "big"))),
    "dualanodiff-lora-truncated": ("dualanodiff", "types/000/whole/pytorch_lora_weights.safetensors", lambda m, d: (
        m / "types/000/whole/pytorch_lora_weights.safetensors").write_bytes(
        (m / "types/000/whole/pytorch_lora_weights.safetensors").read_bytes()[:100])),
    "dualanodiff-interaction-garbage": ("dualanodiff", "types/001/interaction.safetensors",
                                        lambda m, d: (m / "types/001/interaction.safetensors").write_bytes(b"not weights")),
    "cagen-json-torn": ("cagen", "cagen.json", lambda m, d: _write_json(m / "cagen.json", "[")),
    "cagen-json-mask-path": ("cagen", "cagen.json", lambda m, d: _edit_json(
        m / "cagen.json", lambda v: v["training_masks"]["cut"].__setitem__(0, "/etc/passwd"))),
    "cagen-controlnet-truncated": ("cagen", "controlnet/diffusion_pytorch_model.safetensors", lambda m, d: (
        m / "controlnet/diffusion_pytorch_model.safetensors").write_bytes(
        (m / "controlnet/diffusion_pytorch_model.safetensors").read_bytes()[:200])),
    "anomalyxfusion-json-torn": ("anomalyxfusion", "anomalyxfusion.json", lambda m, d: _write_json(m / "anomalyxfusion.json", "{")),
    "anomalyxfusion-json-mask-path": ("anomalyxfusion", "anomalyxfusion.json", lambda m, d: _edit_json(
        m / "anomalyxfusion.json", lambda v: v["training_masks"]["cut"].__setitem__(0, "../../x.png"))),
    "anomalyxfusion-json-captions": ("anomalyxfusion", "anomalyxfusion.json", lambda m, d: _edit_json(
        m / "anomalyxfusion.json", lambda v: v["captions"].__setitem__("cut", []))),
    "anomalyxfusion-weights-truncated": ("anomalyxfusion", "anomalyxfusion.safetensors", lambda m, d: (
        m / "anomalyxfusion.safetensors").write_bytes((m / "anomalyxfusion.safetensors").read_bytes()[:100])),
    "textual-inversion-weights-garbage": ("textual-inversion", "embeddings.safetensors",
                                          lambda m, d: (m / "embeddings.safetensors").write_bytes(b"not weights")),
    # foreign or tampered contents (before: an internal error inside generation after run.json, a width-1
    # tensor broadcast silently, a sample drawn from an empty list, an error line listing every key)
    "textual-inversion-embedding-width": ("textual-inversion", "embeddings.safetensors",
                                          lambda m, d: _edit_tensors(m / "embeddings.safetensors", "vectors", width=40)),
    "anomalydiffusion-token-width": ("anomalydiffusion", "anomalydiffusion.safetensors",
                                     lambda m, d: _edit_tensors(m / "anomalydiffusion.safetensors", "anomaly_tokens", width=1)),
    "anomalydiffusion-weights-missing-keys": ("anomalydiffusion", "anomalydiffusion.safetensors",
                                              lambda m, d: _edit_tensors(m / "anomalydiffusion.safetensors", "spatial_encoder.")),
    "anomalyxfusion-weights-missing-keys": ("anomalyxfusion", "anomalyxfusion.safetensors",
                                            lambda m, d: _edit_tensors(m / "anomalyxfusion.safetensors", "mif.")),
    "anomalydiffusion-json-empty-masks": ("anomalydiffusion", "anomalydiffusion.json", lambda m, d: _edit_json(
        m / "anomalydiffusion.json", lambda v: v["training_masks"].__setitem__("cut", []))),
    "cagen-json-empty-masks": ("cagen", "cagen.json", lambda m, d: _edit_json(
        m / "cagen.json", lambda v: v["training_masks"].__setitem__("hole", []))),
    "crops-json-empty": ("croppaste", "crops.json", lambda m, d: _write_json(m / "crops.json", [])),
    "generator-json-defect-types-empty": ("croppaste", "generator.json",
                                          lambda m, d: _edit_json(m / "generator.json", lambda v: v.update(defect_types=[]))),
}

# what the line of a case says besides "corrupt" (before: torch's bare "Error(s) in loading state_dict for X:")
TAMPER_SAYS = {"anomalydiffusion-weights-missing-keys": 'Missing key(s) in state_dict: "',
               "anomalyxfusion-weights-missing-keys": 'Missing key(s) in state_dict: "',
               "textual-inversion-embedding-width": "(3, 40)", "anomalydiffusion-token-width": "anomaly_tokens"}


def _edit_tensors(path: Path, prefix: str, width: int | None = None) -> None:
    """The tensors named ``prefix...`` made ``width`` wide in their last dimension, or removed."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    for name in [n for n in tensors if n.startswith(prefix)]:
        if width is None:
            del tensors[name]
        else:
            tensors[name] = torch.zeros(*tensors[name].shape[:-1], width)
    save_file(tensors, str(path))


def _crop(path: Path, rows: int, columns: int) -> None:
    image = Image.open(path)
    image.crop((0, 0, image.width - columns, image.height - rows)).save(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The demo's fabric with images of mixed sizes, a pixel or two apart, as KolektorSDD's: every
    method fits and generates on it (the models below; `test_pristine_models_load_and_generate`)."""
    root = make_demo_dataset(tmp_path_factory.mktemp("data"), n_good=3, n_test_good=1, n_defect=3, size=64,
                             categories=("fabric",))
    fabric = root / "fabric"
    for k, image in enumerate(sorted(fabric.glob("test/[!g]*/*.png"))):  # each type's training image its own size
        for path in (image, fabric / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"):
            _crop(path, k % 3, k % 2)
    _crop(fabric / "train" / "good" / "001.png", 1, 2)
    return root


@pytest.fixture(scope="module")
def models(data, tmp_path_factory) -> dict[str, Path]:
    """Pristine fitted models (tiny settings), fitted in-process once; each case tampers a copy."""
    from anomalygen import pipeline

    root = tmp_path_factory.mktemp("models")
    options = {"cutpaste": {}, "croppaste": {}, "draem": {}, "anomalydiffusion": AD_TINY, "dualanodiff": {**TINY, "rank": 4, "mask_tries": 1},
               "cagen": {**TINY, "max_per_type": 1},
               "anomalyxfusion": {**TINY, "tokens": 2, "mask_embedding": 16},
               "textual-inversion": {k: v for k, v in TINY.items() if k != "checkpoint_every"}}
    return {name: pipeline.fit(name, data, root / name, category="fabric", options=opts) for name, opts in options.items()}


def _generate(data: Path, out: Path, *args: str) -> list[str]:
    return ["generate", "--data", str(data), "--category", "fabric", "--out", str(out), "--num", "2", *args]


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_bad_option_is_one_line_before_anything_is_written(case, data, tmp_path):
    command, fragments = OPTION_CASES[case]
    out = tmp_path / "out"
    if command[0] == "generate":
        args = _generate(data, out, *command[1:])
    else:
        args = [*command, "--data", str(data), "--category", "fabric", "--out", str(out)]
    before = snapshot(data)
    result = run_cli(*args, cwd=tmp_path, env=ENV)
    assert_user_error(result, *fragments)
    assert_unchanged(before, data)
    assert not out.exists()
    CASES.append(f"option:{case}")


@pytest.mark.parametrize("case", list(TAMPER_CASES))
def test_tampered_model_is_corrupt_not_a_traceback(case, data, models, tmp_path):
    method, name, tamper = TAMPER_CASES[case]
    model, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(models[method], model)
    tamper(model, data)
    before_data, before_model = snapshot(data), snapshot(model)
    result = run_cli(*_generate(data, out, "--checkpoint", str(model)), cwd=tmp_path, env=ENV)
    line = assert_user_error(result, str(model / name))
    assert "corrupt" in line and len(line) < 400, line  # the file and its first problem, in one short line
    assert TAMPER_SAYS.get(case, "") in line
    assert_unchanged(before_data, data)
    assert_unchanged(before_model, model)
    assert not out.exists()
    CASES.append(f"state:{case}")


def test_a_rejected_option_leaves_nothing_that_refuses_the_corrected_command(data, tmp_path):
    """Before: `--set ops=abc` crashed mid-run after writing run.json, which then refused `ops=2`."""
    out = tmp_path / "out"
    assert_user_error(run_cli(*_generate(data, out, "--method", "draem", "--set", "ops=abc"), env=ENV), "ops")
    fixed = run_cli(*_generate(data, out, "--method", "draem", "--set", "ops=2"), env=ENV)
    assert fixed.returncode == 0, fixed.output
    assert len((out / "fabric" / "manifest.jsonl").read_text().splitlines()) == 2


def test_pristine_models_load_and_generate(data, models, tmp_path):
    """The untampered copies work, so every failure above is the tampering's; and every method fits
    (the ``models`` fixture) and generates on defect and good images of mixed sizes (before: CAGen's
    fit stacked masks of different sizes, an internal error)."""
    sizes = {Image.open(p).size for p in (data / "fabric").glob("*/*/*.png")}
    assert {(64, 64), (63, 63), (64, 63), (63, 64), (62, 63)} <= sizes
    assert set(models) == set(METHODS)
    for method, model in models.items():
        result = run_cli(*_generate(data, tmp_path / method, "--checkpoint", str(model), "--max-attempts", "1", "--keep-failing"), env=ENV)
        assert result.returncode == 0, result.output


def _ambiguous_mask(data: Path) -> list[str]:
    """A second mask of fabric's cut/000.png under the other naming convention (NNN.png), other pixels."""
    folder = data / "fabric" / "ground_truth" / "cut"
    Image.open(folder / "001_mask.png").save(folder / "000.png")
    return [str(folder / "000_mask.png"), str(folder / "000.png"), "ambiguous mask"]


def _foreign_weights(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({"classifier.weight": torch.zeros(2, 2)}, str(path))
    return path


class _Payload:
    """Pickled, it runs ``touch FILE`` when unpickled by anything but a weights-only loader."""

    def __init__(self, file: Path):
        self.file = file

    def __reduce__(self):
        return os.system, (f"touch {self.file}",)


@pytest.fixture(scope="module")
def pickled(tmp_path_factory) -> Path:
    """A base-model folder (diffusers layout) whose UNet weights are a pickle ``.bin`` with code in it,
    and a CLIP image-encoder folder whose weights are one (``ran`` appears if the code runs)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from anomalygen.diffusion.tiny import tiny_image_encoder_config
    from tests.unit.diffusion.test_architectures import write_model

    root = tmp_path_factory.mktemp("pickled")
    base = write_model(root / "base", "sd")
    (base / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"weight": _Payload(root / "ran")}, base / "unet" / "diffusion_pytorch_model.bin")
    CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(tiny_image_encoder_config())).save_pretrained(root / "encoder")
    (root / "encoder" / "model.safetensors").unlink()
    torch.save({"weight": _Payload(root / "ran")}, root / "encoder" / "pytorch_model.bin")
    return root


# id: (args(data root, target folder), fragments the error line must hold, a file the user put in the
# target folder before, or None: no target folder); the target must be left as it was (absent: absent)
REFUSAL_CASES: dict[str, tuple[Callable[[Path, Path], list], Callable[[Path, Path], list], str | None]] = {
    # before: fit saved into the user's folder and replaced their generator.json, exit 0
    "fit-out-holds-user-files": (lambda d, t: ["fit", "--method", "croppaste", "--data", d, "--category", "fabric", "--out", t],
                                 lambda d, t: [str(t), "did not write", "generator.json", "--overwrite"], "generator.json"),
    # before: the demo wrote data/, samples/ and index.html into the user's folder (theirs replaced), exit 0
    "demo-out-holds-user-files": (lambda d, t: ["demo", "--out", t, "--num", 1],
                                  lambda d, t: [str(t), "did not write", "index.html", "--overwrite"], "index.html"),
    # before: the benchmark wrote comparison.html / .md and its method folders into it, exit 0
    "benchmark-out-holds-user-files": (lambda d, t: ["benchmark", "--data", d, "--category", "fabric", "--methods", "cutpaste",
                                                     "--out", t, "--preset", "quick"],
                                       lambda d, t: [str(t), "did not write", "comparison.html", "--overwrite"],
                                       "comparison.html"),
    # before: run.json and the lock were left in the new output folder
    "generate-unknown-defect-type": (lambda d, t: _generate(d, t, "--method", "croppaste", "--defect-type", "crack"),
                                     lambda d, t: ["--defect-type 'crack'", "cut, hole, stain"], None),
    "generate-unknown-defect-type-checkpoint": (lambda d, t: _generate(d, t, "--checkpoint", t.parent / "model",
                                                                       "--defect-type", "crack"),
                                                lambda d, t: ["--defect-type 'crack'", "cut, hole, stain"], None),
    # before: the demo dataset was written, then --num refused
    "demo-num-zero": (lambda d, t: ["demo", "--out", t, "--num", 0], lambda d, t: ["--num 0"], None),
    "demo-unknown-method": (lambda d, t: ["demo", "--out", t, "--methods", "cutpaste,nosuch", "--num", 1],
                            lambda d, t: ["unknown method 'nosuch'"], None),
    # before: the setting was ignored
    "benchmark-set-for-a-method-not-run": (
        lambda d, t: ["benchmark", "--data", d, "--category", "fabric", "--methods", "cutpaste", "--out", t,
                      "--set", "croppaste.min_area=4"], lambda d, t: ["--set croppaste.min_area=4", "not a benchmarked method"],
        None),
    # size-like evaluation, pretrain and benchmark options, the limit in the line (before: out of memory)
    "evaluate-resolution-huge": (lambda d, t: ["evaluate", "--generated", d, "--data", d, "--category", "fabric",
                                               "--report-dir", t, "--resolution", 100000], lambda d, t: ["--resolution got 100000", "1024"], None),
    "evaluate-base-huge": (lambda d, t: ["evaluate", "--generated", d, "--data", d, "--category", "fabric", "--report-dir", t,
                                         "--base", 100000], lambda d, t: ["--base got 100000", "<= 512"], None),
    "benchmark-draem-resolution-huge": (lambda d, t: ["benchmark", "--data", d, "--methods", "cutpaste", "--out", t,
                                                      "--draem-resolution", 65536], lambda d, t: ["--draem-resolution got 65536"], None),
    "benchmark-num-per-type-huge": (lambda d, t: ["benchmark", "--data", d, "--methods", "cutpaste", "--out", t,
                                                  "--num-per-type", 10**9], lambda d, t: ["--num-per-type got 1000000000", "1000000"], None),
    "pretrain-batch-size-huge": (lambda d, t: ["pretrain", "--data", d, "--out", t, "--size", "tiny", "--batch-size", 100000],
                                 lambda d, t: ["--batch-size got 100000", "256"], None),
    # before: "could not be loaded (...); download the model into it", and an internal error
    "fit-base-model-pickle-bin": (lambda d, t: ["fit", "--method", "textual-inversion", "--data", d, "--category", "fabric",
                                                "--out", t, "--model", t.parent / "pickled" / "base"],
                                  lambda d, t: [str(t.parent / "pickled" / "base" / "unet" / "diffusion_pytorch_model.bin"),
                                                "refused", "unsafe", "pickle code"], None),
    "fit-image-encoder-pickle-bin": (lambda d, t: ["fit", "--method", "anomalyxfusion", "--data", d, "--category", "fabric",
                                                   "--out", t, "--model", "tiny", "--set", f"image_encoder={t.parent / 'pickled' / 'encoder'}"],
                                     lambda d, t: [str(t.parent / "pickled" / "encoder" / "pytorch_model.bin"), "refused", "unsafe"],
                                     None),
    # before: one line listing every missing key of the network (thousands of characters)
    "evaluate-inception-weights-foreign": (lambda d, t: ["evaluate", "--generated", d, "--data", d, "--category", "fabric",
                                                         "--report-dir", t, "--metrics", "is", "--inception-weights",
                                                         _foreign_weights(t.parent / "foreign.safetensors")],
                                           lambda d, t: [str(t.parent / "foreign.safetensors"), 'Missing key(s) in state_dict: "',
                                                         "more"], None),
    # before: one of the two masks was used without a word
    "generate-ambiguous-mask": (lambda d, t: _generate(d, t, "--method", "croppaste"), lambda d, t: _ambiguous_mask(d), None),
}


@pytest.mark.parametrize("case", list(REFUSAL_CASES))
def test_a_refusal_writes_nothing(case, data, models, pickled, tmp_path):
    """Every option and input is checked before anything is written: the refused command leaves
    the target folder as it was (absent stays absent), the data and the model untouched."""
    args, fragments, user_file = REFUSAL_CASES[case]
    source = tmp_path / "data"
    shutil.copytree(data, source)
    shutil.copytree(models["croppaste"], tmp_path / "model")
    (tmp_path / "pickled").symlink_to(pickled)
    target = tmp_path / "target"
    if user_file:
        target.mkdir()
        (target / user_file).write_text("the user's own\n")
        (target / "notes.txt").write_text("mine\n")
    expected = fragments(source, target)
    before = {path: snapshot(path) for path in (source, tmp_path / "model", target) if path.exists()}
    result = run_cli(*map(str, args(source, target)), cwd=tmp_path, env=ENV)
    line = assert_user_error(result, *expected)
    assert len(line) < 400, line
    for path, state in before.items():
        assert_unchanged(state, path)
    assert target.exists() == bool(user_file)
    assert not (pickled / "ran").exists()  # no pickle code ran
    CASES.append(f"refusal:{case}")


def test_demo_with_a_base_model_that_does_not_load_writes_nothing(tmp_path):
    """Before: the demo dataset was written, then the diffusion method's base model failed to load."""
    missing = tmp_path / "no-model"
    result = run_cli("demo", "--out", tmp_path / "target", "--methods", "textual-inversion", "--num", "1",
                     env={**ENV, "ANOMALYGEN_MODEL": str(missing)})
    assert_user_error(result, str(missing))
    assert not (tmp_path / "target").exists()


def test_fit_overwrite_saves_into_a_folder_of_user_files_and_keeps_the_others(data, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "notes.txt").write_text("mine\n")
    args = ["fit", "--method", "croppaste", "--data", data, "--category", "fabric", "--out", target]
    assert_user_error(run_cli(*args, env=ENV), str(target), "--overwrite")
    assert run_cli(*args, "--overwrite", env=ENV).returncode == 0
    assert (target / "notes.txt").read_text() == "mine\n" and (target / "generator.json").is_file()
    again = run_cli(*args, env=ENV)  # its own folder now (the lock file it made): a re-fit needs no --overwrite
    assert again.returncode == 0, again.output


def test_datasets_info_lists_an_ambiguous_mask(data, tmp_path):
    shutil.copytree(data, tmp_path / "data")
    fragments = _ambiguous_mask(tmp_path / "data")
    result = run_cli("datasets", "info", tmp_path / "data", "--category", "fabric", env=ENV)
    assert result.returncode == 0, result.output
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem")]
    assert len(problems) == 1 and all(fragment in problems[0] for fragment in fragments), result.stdout
