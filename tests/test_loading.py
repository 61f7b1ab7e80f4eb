"""Loading models offline from diffusers directories: round trip, layout errors, pickles refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from negprompt.errors import NegpromptError
from negprompt.guidance.plan import Guidance, Term
from negprompt.models.loading import load_components
from negprompt.sampling.loop import sample
from negprompt.sampling.schedulers import make_scheduler


def run(components):
    guidance = Guidance(positive=Term("a cat"), negatives=(Term("glasses"),))
    return sample(components, guidance, make_scheduler("default", components.scheduler), [1], 3, 32, 32).images


def test_saved_directory_loads_and_samples_the_same(tiny_sd, tiny_sd_dir):
    loaded = load_components(tiny_sd_dir)
    assert type(loaded.scheduler).__name__ == "PNDMScheduler"
    assert loaded.vae is not None
    assert np.array_equal(run(loaded), run(tiny_sd))
    assert sorted(p.name for p in (tiny_sd_dir / "unet").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]


def copy_of(tiny_sd_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, target)
    return target


def test_missing_model_index(tiny_sd_dir, tmp_path):
    model = copy_of(tiny_sd_dir, tmp_path)
    (model / "model_index.json").unlink()
    with pytest.raises(NegpromptError, match="model_index.json is missing"):
        load_components(model)


def test_missing_part(tiny_sd_dir, tmp_path):
    model = copy_of(tiny_sd_dir, tmp_path)
    shutil.rmtree(model / "unet")
    with pytest.raises(NegpromptError, match="lacks the part.*unet"):
        load_components(model)


def test_pickled_weights_are_refused(tiny_sd_dir, tmp_path):
    model = copy_of(tiny_sd_dir, tmp_path)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    torch.save({"w": torch.zeros(1)}, model / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(NegpromptError, match="pickled weights.*arbitrary code"):
        load_components(model)


def test_single_file_checkpoint_is_refused(tmp_path):
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"\0" * 16)
    with pytest.raises(NegpromptError, match="single file"):
        load_components(single)


def test_model_id_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(NegpromptError, match="not in the local Hugging Face cache"):
        load_components("someone/some-model")


def test_model_id_in_cache_loads_offline(tiny_sd_dir, tmp_path, monkeypatch):
    """A model id resolves to its snapshot in the hub cache layout, with no network."""
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-sd"
    commit = "0" * 40
    shutil.copytree(tiny_sd_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    loaded = load_components("someone/tiny-sd")
    assert loaded.vae is not None


def test_nonexistent_path(tmp_path):
    with pytest.raises(NegpromptError, match="no model at"):
        load_components(str(tmp_path / "nothing" / "here"))


def test_bad_model_index(tiny_sd_dir, tmp_path):
    model = copy_of(tiny_sd_dir, tmp_path)
    index = json.loads((model / "model_index.json").read_text())
    index["unet"] = ["diffusers", "NotAModel"]
    (model / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(NegpromptError, match="unsupported class"):
        load_components(model)
