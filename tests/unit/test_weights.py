"""Every evaluation weights file is read without pickle code (issue 11, defect 1): a crafted file whose
unpickling would create a marker file is refused, naming the file, and the marker never appears."""

import re
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet34

from anomalygen.errors import DataError
from anomalygen.evaluation.classification import RESNET34_URL, ClassificationConfig, build_resnet34, resnet34_weights
from anomalygen.evaluation.ic_lpips import BACKBONE_URLS, load_lpips
from anomalygen.evaluation.inception_score import load_inception
from anomalygen.weights import hub_checkpoint, load_state_dict

from tests.helpers.cli_harness import assert_user_error, run_cli

torch.set_num_threads(1)


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the file appears if pickle code ever runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _malicious(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.zeros(1), "payload": Payload(marker)}, path)
    return path


def test_the_crafted_file_is_armed(tmp_path):
    """Guard for the tests below: a plain pickle load of the crafted file does create the marker."""
    marker = tmp_path / "armed"
    torch.load(_malicious(tmp_path / "evil.pth", marker), weights_only=False)
    assert marker.exists()


def test_malicious_weights_are_refused_everywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    marker = tmp_path / "pwned"
    explicit = _malicious(tmp_path / "inception.pth", marker)
    with pytest.raises(DataError, match=re.escape(f"{explicit}: refused: loading it would run pickle code")):
        load_inception(str(explicit))
    for url in BACKBONE_URLS.values():
        _malicious(hub_checkpoint(url), marker)
    for net in BACKBONE_URLS:
        with pytest.raises(DataError, match=re.escape(f"{hub_checkpoint(BACKBONE_URLS[net])}: refused")):
            load_lpips(net)
    cached = _malicious(hub_checkpoint(RESNET34_URL), marker)
    with pytest.raises(DataError, match=re.escape(f"{cached}: refused")):
        build_resnet34(2, resnet34_weights(ClassificationConfig()))
    assert not marker.exists()


def test_evaluate_command_refuses_malicious_inception_weights(tmp_path):
    marker = tmp_path / "pwned"
    evil = _malicious(tmp_path / "evil.pth", marker)
    result = run_cli("evaluate", "--generated", tmp_path / "nothing", "--data", tmp_path / "nothing", "--metrics", "is",
                     "--inception-weights", evil, env={"TORCH_HOME": str(tmp_path / "torch")})
    assert_user_error(result, str(evil), "pickle code")
    assert not marker.exists() and not (tmp_path / "nothing").exists()


def test_missing_explicit_inception_weights_is_an_error_not_a_skip(tmp_path):
    from anomalygen.evaluation.run import prepare

    with pytest.raises(DataError, match="nowhere.pth: weights file not found"):
        prepare(None, inception_weights=str(tmp_path / "nowhere.pth"))  # even with the default metrics


def test_corrupt_and_foreign_files_are_named(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a weights file")
    with pytest.raises(DataError, match="garbage.pth: not a readable weights file"):
        load_state_dict(garbage)
    wrong = tmp_path / "resnet34-b627a593.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, wrong)
    with pytest.raises(DataError, match="resnet34-b627a593.pth: does not hold torchvision ResNet-34 weights"):
        build_resnet34(2, wrong)


def test_plain_weights_load_into_the_modules(tmp_path, monkeypatch):
    """The pickle-free path gives the same networks as the libraries' own loaders."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)
    reference = resnet34()
    hub_checkpoint(RESNET34_URL).parent.mkdir(parents=True)
    torch.save(reference.state_dict(), hub_checkpoint(RESNET34_URL))
    model, label = build_resnet34(3, resnet34_weights(ClassificationConfig()))
    assert label.startswith("imagenet") and torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.out_features == 3
    # lpips: torchvision AlexNet's ``features`` land in lpips' slices; the result equals lpips' own load.
    import lpips
    from torchvision.models import alexnet

    torch.manual_seed(1)
    tv_alex = alexnet()
    torch.save(tv_alex.state_dict(), hub_checkpoint(BACKBONE_URLS["alex"]))
    ours = load_lpips("alex")
    theirs = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    theirs.net.load_state_dict({n: tv_alex.state_dict()["features." + n.split(".", 1)[1]] for n in theirs.net.state_dict()})
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.allclose(ours(x, y), theirs.eval()(x, y))


def test_inception_weights_load_like_torch_fidelity_does(tmp_path):
    from unittest import mock

    from torchmetrics.image.fid import NoTrainInceptionV3

    torch.manual_seed(0)
    with mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, state, strict=True: None), \
            mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {}):
        random = NoTrainInceptionV3(name="inception-v3-compat", features_list=["logits_unbiased"])
    path = tmp_path / "inception.pth"
    torch.save(random.state_dict(), path)
    ours, about = load_inception(str(path))
    theirs = NoTrainInceptionV3(name="inception-v3-compat", features_list=["logits_unbiased"],
                                feature_extractor_weights_path=str(path))  # benign file: their pickle load is safe here
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert torch.equal(ours(images), theirs(images))
    assert str(path) in about and "torch-fidelity" in about
