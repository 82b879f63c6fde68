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

import anomalygen
from anomalygen.data.demo import make_demo_dataset
from cli_harness import CASES, assert_unchanged, assert_user_error, run_cli, snapshot

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
                                ["mask_source", "threshold, attention"]),
    "textual-inversion-prompt": (["fit", "--method", "textual-inversion", "--set", "prompt=a photo"], ["prompt", "{}"]),
    "textual-inversion-device": (["fit", "--method", "textual-inversion", "--device", "cuda:7"], ["device", "cuda:7"]),
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
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("data"), n_good=3, n_test_good=1, n_defect=3, size=64,
                             categories=("fabric",))


@pytest.fixture(scope="module")
def models(data, tmp_path_factory) -> dict[str, Path]:
    """Pristine fitted models (tiny settings), fitted in-process once; each case tampers a copy."""
    from anomalygen import pipeline

    root = tmp_path_factory.mktemp("models")
    options = {"croppaste": {}, "anomalydiffusion": AD_TINY, "dualanodiff": {**TINY, "rank": 4, "mask_tries": 1},
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
    assert "corrupt" in line
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
    """The untampered copies work, so every failure above is the tampering's (textual inversion's
    round trip is in test_textual_inversion)."""
    for method in ("croppaste", "anomalydiffusion", "dualanodiff", "cagen", "anomalyxfusion"):
        model = models[method]
        result = run_cli(*_generate(data, tmp_path / method, "--checkpoint", str(model), "--max-attempts", "1", "--keep-failing"), env=ENV)
        assert result.returncode == 0, result.output
