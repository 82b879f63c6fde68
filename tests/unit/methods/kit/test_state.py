"""``methods.kit.state``: a fitted method's training masks on disk, saved again into the same folder and
checked against the model file that records them."""

import numpy as np
import pytest

from anomalygen.errors import DataError
from anomalygen.methods.kit.state import mask_paths, read_masks, write_masks


def _masks(value: bool, count: int) -> list[np.ndarray]:
    return [np.full((8, 8), value) for _ in range(count)]


def test_a_model_saved_again_into_its_folder_keeps_the_new_masks(tmp_path):
    """Saving a re-fitted model over its folder (the Python API's ``save`` on the same path) must not
    fail on the mask folders of the first save, and the second save's masks are the ones read back."""
    write_masks(tmp_path, {"scratch": _masks(False, 2)}, ["scratch"])
    names = write_masks(tmp_path, {"scratch": _masks(True, 1)}, ["scratch"])
    masks = read_masks(mask_paths(tmp_path, names, ["scratch"], tmp_path / "model.json"))
    assert len(masks["scratch"]) == 1 and masks["scratch"][0].all()


def test_a_mask_path_leading_outside_the_folder_names_the_model_file_that_recorded_it(tmp_path):
    recorded_in = tmp_path / "model.json"
    with pytest.raises(DataError) as error:
        mask_paths(tmp_path, {"scratch": ["../elsewhere.png"]}, ["scratch"], recorded_in)
    assert str(error.value).startswith(f"{recorded_in}: corrupt (path '../elsewhere.png'")


def test_modules_whose_names_prefix_each_other_and_named_tensors_load_back_each_to_its_own(tmp_path):
    """``mask`` and ``mask_model`` share a prefix: each must get exactly its own keys; tensors saved by
    name come back by name."""
    import torch

    from anomalygen.methods.kit.state import read_modules, write_modules

    saved = {"mask": torch.nn.Linear(2, 2), "mask_model": torch.nn.Linear(2, 2)}
    with torch.no_grad():
        saved["mask"].weight.fill_(1.0), saved["mask_model"].weight.fill_(2.0)
    write_modules(tmp_path / "m.safetensors", saved, {"embeddings": torch.full((3,), 5.0)})
    loaded = {"mask": torch.nn.Linear(2, 2), "mask_model": torch.nn.Linear(2, 2)}
    tensors = read_modules(tmp_path / "m.safetensors", loaded, torch.device("cpu"))
    assert (loaded["mask"].weight == 1).all() and (loaded["mask_model"].weight == 2).all()
    assert torch.equal(tensors["embeddings"], torch.full((3,), 5.0))


@pytest.mark.parametrize("recorded", [[], "000.png"], ids=["empty", "not-a-list"])
def test_a_type_recorded_without_a_list_of_masks_is_refused(tmp_path, recorded):
    with pytest.raises(ValueError, match="training_masks of type 'scratch' must be a non-empty list"):
        mask_paths(tmp_path, {"scratch": recorded}, ["scratch"], tmp_path / "model.json")


def test_an_unreadable_mask_is_one_error_naming_its_file(tmp_path):
    bad = tmp_path / "000.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError) as error:
        read_masks({"scratch": [bad]})
    assert str(error.value).startswith(f"{bad}: ")
