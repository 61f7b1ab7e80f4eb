"""Hostile model folders, weights, scheduler configs and embeddings (issue 33, items 3, 5, 6, 7, 8): each is
written here from the tiny fixtures, and each ends in one line and exit 2 before any sampling, with no PNG
written and the folder left as it was."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_usage_error
from safetensors.torch import load_file, save_file

from negprompt.interfaces.cli import main
from negprompt.limits import MAX_EMBEDDING_VECTORS, MAX_TRAIN_TIMESTEPS
from negprompt.models.embeddings import EmbeddingError
from negprompt.models.loading import ModelLoadError, load_components

GENERATE = ["generate", "a photo of a cat", "--steps", "2", "--size", "32", "-q"]


def copy_model(source: Path, tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(source, model)
    return model


def generate(model: Path, tmp_path: Path, *extra: str) -> tuple[int, Path]:
    out = tmp_path / "out.png"
    return main([*GENERATE, "--model", str(model), *extra, "--out", str(out)]), out


def weights_file(model: Path, part: str) -> Path:
    (path,) = (model / part).glob("*.safetensors")
    return path


def rewrite_weights(path: Path, how: str) -> None:
    """The part's safetensors with its keys renamed, one key dropped, a key added, or one reshaped."""
    tensors = load_file(str(path))
    if how == "renamed":
        tensors = {f"model.{key}": value for key, value in tensors.items()}
    elif how == "dropped":
        del tensors[sorted(tensors)[len(tensors) // 2]]
    elif how == "extra":
        tensors["extra_head.weight"] = torch.zeros(3, 3)
    else:  # reshaped
        key = sorted(tensors)[0]
        tensors[key] = torch.zeros(*(side + 1 for side in tensors[key].shape))
    save_file(tensors, str(path))


# ---------------------------------------------------------------- item 3: the keys of every part


@pytest.mark.parametrize("how, counts", [("renamed", "0 of"), ("dropped", "1 missing"), ("extra", "1 unexpected")])
@pytest.mark.parametrize("part", ["text_encoder", "unet", "vae"])
def test_a_weight_file_with_foreign_keys_is_refused_naming_the_part_and_counts(
    part, how, counts, tiny_sd_dir, tmp_path, capsys
):
    model = copy_model(tiny_sd_dir, tmp_path)
    rewrite_weights(weights_file(model, part), how)
    before = sorted((p, p.stat().st_size) for p in model.rglob("*") if p.is_file())
    code, out = generate(model, tmp_path)
    assert_usage_error(code, capsys, f"negprompt: error: {part}: ", out)
    expected = len(load_file(str(weights_file(tiny_sd_dir, part))))
    if how == "renamed":
        message = f"{part}: 0 of {expected} expected weights found"
    elif how == "dropped":
        message = f"{part}: {expected - 1} of {expected} expected weights found"
    else:
        message = f"{part}: {expected} of {expected} expected weights found"
    with pytest.raises(ModelLoadError, match=message) as error:
        load_components(model)
    assert counts in str(error.value) and str(model / part) in str(error.value)
    assert before == sorted((p, p.stat().st_size) for p in model.rglob("*") if p.is_file())  # nothing written there


def test_a_text_encoder_weight_of_another_shape_is_counted(tiny_sd_dir, tmp_path, capsys):
    """transformers would log a report and raise; the part, the key and both shapes come in one line."""
    model = copy_model(tiny_sd_dir, tmp_path)
    rewrite_weights(weights_file(model, "text_encoder"), "reshaped")
    code, out = generate(model, tmp_path)
    assert_usage_error(code, capsys, "1 of another shape", out)


def test_keys_the_model_class_declares_ignorable_still_load(tiny_sd_dir, tmp_path):
    """Real SD 1.x text encoders carry CLIP's position_ids buffer, which transformers ignores: they load."""
    model = copy_model(tiny_sd_dir, tmp_path)
    path = weights_file(model, "text_encoder")
    tensors = load_file(str(path))
    prefix = "text_model." if any(key.startswith("text_model.") for key in tensors) else ""
    tensors[f"{prefix}embeddings.position_ids"] = torch.arange(77)[None]
    save_file(tensors, str(path))
    components = load_components(model)
    reference = load_components(tiny_sd_dir)
    for loaded, original in zip(components.modules, reference.modules):
        for (name, a), (_, b) in zip(loaded.state_dict().items(), original.state_dict().items()):
            assert torch.equal(a, b), name


def test_a_transformer_with_foreign_keys_is_refused(tiny_sd3_dir, tmp_path):
    model = copy_model(tiny_sd3_dir, tmp_path)
    rewrite_weights(weights_file(model, "transformer"), "renamed")
    with pytest.raises(ModelLoadError, match=r"^transformer: 0 of \d+ expected weights found"):
        load_components(model)


# ---------------------------------------------------------------- items 7 and 8: model_index.json


def write_index(model: Path, content) -> None:
    path = model / "model_index.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "folder":
        path.unlink()
        path.mkdir()
    else:
        index = json.loads(path.read_text())
        path.write_text(json.dumps(content(index)))


INDEX_CASES = {
    "a JSON list": (lambda index: [index], "must hold a JSON object"),
    "unet 5": (lambda index: {**index, "unet": 5}, '"unet" must be [library, class name]'),
    "unet []": (lambda index: {**index, "unet": []}, '"unet" must be [library, class name]'),
    "vae a string": (lambda index: {**index, "vae": "AutoencoderKL"}, '"vae" must be [library, class name]'),
    "unet [library, null]": (lambda index: {**index, "unet": ["diffusers", None]}, '"unet" must be [library'),
    "class name a list": (lambda index: {**index, "_class_name": []}, '"_class_name" must be a pipeline class'),
    "not UTF-8": (b'{"_class_name": "Stable\xff"}', "is not UTF-8 text (byte 0xff"),
    "nested 100 000 deep": (b"[" * 100_000, "nests JSON too deeply"),
    "an integer of 5000 digits": (b'{"steps": ' + b"9" * 5000 + b"}", "is not valid JSON"),
    "a folder": ("folder", "must be a file holding a JSON object, but it is a folder"),
}


@pytest.mark.parametrize("case", INDEX_CASES)
def test_a_hostile_model_index_is_one_line(case, tiny_sd_dir, tmp_path, capsys):
    content, message = INDEX_CASES[case]
    model = copy_model(tiny_sd_dir, tmp_path)
    write_index(model, content)
    code, out = generate(model, tmp_path)
    assert_usage_error(code, capsys, message, out)  # exit 2: a folder is the user's input, not a machine fault


@pytest.mark.parametrize(
    "file, content, message",
    [
        ("unet/config.json", "[1, 2]", "must hold a JSON object ({...}), not a list"),
        ("scheduler/scheduler_config.json", '"PNDMScheduler"', "must hold a JSON object ({...}), not a str"),
    ],
)
def test_a_config_that_is_not_an_object_gives_exactly_one_stderr_line(file, content, message, tiny_sd_dir, tmp_path):
    """diffusers printed a FutureWarning (from_config given a path) before the error, and named a download
    it never tried: the real stderr of a real process has one line."""
    model = copy_model(tiny_sd_dir, tmp_path)
    (model / file).write_text(content)
    out = tmp_path / "out.png"
    argv = [*GENERATE, "--model", str(model), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "negprompt", *argv], capture_output=True, text=True, env=env, timeout=120
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("negprompt: error: ") and message in lines[0] and str(model / file) in lines[0]
    assert not out.exists()


# ---------------------------------------------------------------- item 6: scheduler configs that would hang


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"num_train_timesteps": 10**12},
            f"num_train_timesteps is 1000000000000; it must be a whole number in 1–{MAX_TRAIN_TIMESTEPS}",
        ),
        ({"num_train_timesteps": 1e12}, "num_train_timesteps is 1000000000000.0"),
        ({"num_train_timesteps": 0}, "num_train_timesteps is 0"),
        (
            {"trained_betas": [0.01] * (MAX_TRAIN_TIMESTEPS + 1)},
            f"trained_betas holds {MAX_TRAIN_TIMESTEPS + 1} values",
        ),
        ({"beta_end": float("nan")}, "holds the number NaN, which is not finite"),
        ({"beta_end": -0.5}, "beta_end is -0.5; scheduler settings are finite numbers, betas in [0, 1)"),
        ({"beta_end": 2.0}, "beta_end is 2.0"),
        ({"steps_offset": 10**400}, "steps_offset is 1000"),
    ],
    ids=[
        "1e12 steps",
        "1e12 as a float",
        "0 steps",
        "too many betas",
        "nan beta",
        "negative beta",
        "beta 2",
        "a 400-digit offset",
    ],
)
def test_a_scheduler_config_that_would_hang_or_poison_is_refused(changes, message, tiny_sd_dir, tmp_path, capsys):
    model = copy_model(tiny_sd_dir, tmp_path)
    path = model / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    code, out = generate(model, tmp_path)
    assert_usage_error(code, capsys, message, out)


@pytest.mark.parametrize(
    "file, key, value",
    [
        ("vae/config.json", "scaling_factor", float("nan")),
        ("unet/config.json", "norm_eps", float("inf")),
        ("text_encoder/config.json", "layer_norm_eps", float("-inf")),
    ],
)
def test_a_config_number_that_is_not_finite_is_refused(file, key, value, tiny_sd_dir, tmp_path, capsys):
    """A NaN VAE scaling factor made a black PNG with exit 0 and a NumPy warning."""
    model = copy_model(tiny_sd_dir, tmp_path)
    path = model / file
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    code, out = generate(model, tmp_path)
    assert_usage_error(code, capsys, f"{path} holds the number {json.dumps(value)}, which is not finite", out)


@pytest.mark.parametrize(
    "content, message",
    [(b'{"steps": 20, "scale": \xff}', "is not UTF-8 text (byte 0xff"), ("folder", "but it is a folder")],
)
def test_a_hostile_negprompt_json_is_one_line(content, message, tiny_sd_dir, tmp_path, capsys):
    model = copy_model(tiny_sd_dir, tmp_path)
    if content == "folder":
        (model / "negprompt.json").mkdir()
    else:
        (model / "negprompt.json").write_bytes(content)
    code, out = generate(model, tmp_path)
    assert_usage_error(code, capsys, message, out)


# ---------------------------------------------------------------- items 5 and 6: embeddings


@pytest.mark.parametrize(
    "tensor, message",
    [
        (torch.full((2, 32), float("nan")), "holds 64 non-finite value(s) (NaN or infinity) of 64"),
        (torch.tensor([[1.0] * 31 + [float("inf")]]), "holds 1 non-finite value(s)"),
        (torch.zeros(20_000, 32), f"holds 20000 vectors; an embedding holds at most {MAX_EMBEDDING_VECTORS}"),
        (torch.zeros(2, 20_000), "has vectors of width 20000"),
        (torch.zeros(2, 4, 32), "must be (vectors, width)"),
        (torch.ones(2, 32, dtype=torch.int64), "holds torch.int64 values"),
    ],
    ids=["all NaN", "one inf", "20 000 vectors", "too wide", "3-D", "integers"],
)
def test_a_hostile_embedding_is_one_line_and_no_png(tensor, message, tiny_sd_dir, tmp_path, capsys):
    """An all-NaN embedding made a black PNG with exit 0 and a NumPy warning; 20 000 vectors took minutes."""
    path = tmp_path / "hostile.safetensors"
    save_file({"emb_params": tensor}, str(path))
    code, out = generate(tiny_sd_dir, tmp_path, "--embedding", f"hostile={path}", "--negative", "hostile")
    assert_usage_error(code, capsys, message, out)


def test_an_embedding_longer_than_the_models_prompts_changes_nothing(tmp_path):
    """The bundled model's prompts hold 14 tokens besides start and end: 20 vectors could never be used."""
    from negprompt.session import Session

    path = tmp_path / "long.safetensors"
    save_file({"emb_params": torch.randn(20, 128)}, str(path))
    session = Session("shapes")
    tokenizer, encoder = session.components.tokenizer, session.components.text_encoder
    sizes = (len(tokenizer), encoder.get_input_embeddings().weight.shape[0])
    with pytest.raises(EmbeddingError, match="holds 20 vectors, but this model's prompts hold at most 14 tokens"):
        session.load_embedding("long", path)
    assert (len(tokenizer), encoder.get_input_embeddings().weight.shape[0]) == sizes
    assert not session.components.embeddings
