"""Textual-inversion ("negative") embeddings: safetensors only, encoded as diffusers' load_textual_inversion
encodes them (SD 1.x and SDXL), recorded in the PNG, one word in attention capture, bad files refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_usage_error
from safetensors.torch import save_file

from negprompt.attention.tokens import tokenize_words
from negprompt.interfaces.cli import main
from negprompt.models.embeddings import EmbeddingError
from negprompt.runspec import SettingsError
from negprompt.session import Session
from negprompt.testing.peers import diffusers_pipeline
from negprompt.testing.tiny_sd import build_tiny_sd, build_tiny_sdxl

TOKEN, NEGATIVE = "easyneg", "easyneg, glasses"


def vectors(count: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def sd_file(tmp_path):
    path = tmp_path / "easyneg.safetensors"
    save_file({"emb_params": vectors(3, 32, 1)}, str(path))  # AUTOMATIC1111's key, 3 vectors
    return path


@pytest.fixture
def sdxl_file(tmp_path):
    path = tmp_path / "easyneg-xl.safetensors"
    save_file({"clip_l": vectors(2, 32, 2), "clip_g": vectors(2, 32, 3)}, str(path))
    return path


def test_sd_negative_embedding_encodes_as_diffusers(sd_file):
    ours, theirs = build_tiny_sd(seed=0), build_tiny_sd(seed=0)
    session = Session(ours)
    embedding = session.load_embedding(TOKEN, sd_file)
    assert (embedding.vectors, len(embedding.sha256)) == (3, 10)
    pipe = diffusers_pipeline(theirs)
    pipe.load_textual_inversion(str(sd_file), token=TOKEN)
    _, negative = pipe.encode_prompt("a cat", "cpu", 1, True, negative_prompt=NEGATIVE)
    mine = session.encode([NEGATIVE])[NEGATIVE].hidden_states
    assert torch.equal(mine, negative)
    without = Session(build_tiny_sd(seed=0)).encode(["glasses"])["glasses"].hidden_states
    assert not torch.allclose(mine, without)  # the embedding's vectors are used
    # the multi-vector token is one word at three positions for attention capture
    tokenized = tokenize_words(ours.tokenizer, NEGATIVE)
    assert tokenized.words[0] == TOKEN and tokenized.positions_of(TOKEN) == (1, 2, 3)
    assert tokenized.positions_of("glasses")[0] > 3


def test_sdxl_negative_embedding_encodes_as_diffusers(sdxl_file):
    from safetensors.torch import load_file

    ours, theirs = build_tiny_sdxl(seed=0), build_tiny_sdxl(seed=0)
    session = Session(ours)
    session.load_embedding(TOKEN, sdxl_file)
    pipe = diffusers_pipeline(theirs)
    state = load_file(str(sdxl_file))  # how diffusers' docs load an SDXL embedding: one call per encoder
    pipe.load_textual_inversion(state["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(
        state["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    _, negative, _, negative_pooled = pipe.encode_prompt("a cat", device="cpu", negative_prompt=NEGATIVE)
    spec = session.spec("a cat", NEGATIVE, steps=2, size=32)
    from negprompt.sampling.loop import Group, encode_groups
    from negprompt.sampling.schedulers import make_scheduler

    encoded = encode_groups(ours, [Group(spec.guidance, (0,))], make_scheduler("default", ours.scheduler), 2, 32, 32)
    mine = next(c for key, c in encoded.items() if key.text == NEGATIVE)
    assert torch.equal(mine.hidden_states, negative) and torch.equal(mine.pooled, negative_pooled)


def test_bad_embeddings_are_refused_and_change_nothing(tmp_path, sd_file, sdxl_file):
    components = build_tiny_sd(seed=0)
    session = Session(components)
    vocabulary = len(components.tokenizer)
    pickle = tmp_path / "easyneg.pt"
    pickle.write_bytes(b"not read")
    cases = [
        (TOKEN, pickle, "pickle.*safetensors only"),
        (TOKEN, tmp_path / "missing.safetensors", "does not exist"),
        (TOKEN, sdxl_file, "SDXL embedding.*one text encoder"),
        ("ca", sd_file, "already in the tokenizer's vocabulary"),
        ("two words", sd_file, "one word"),
        ("neg_1", sd_file, "ends in _<number>"),
    ]
    wide = tmp_path / "wide.safetensors"
    save_file({"emb_params": vectors(1, 768, 0)}, str(wide))
    cases.append((TOKEN, wide, "width 768.*takes 32"))
    for token, path, message in cases:
        with pytest.raises(EmbeddingError, match=message):
            session.load_embedding(token, path)
    assert len(components.tokenizer) == vocabulary and not components.embeddings
    with pytest.raises(EmbeddingError, match="clip_l and clip_g"):
        Session(build_tiny_sdxl(seed=0)).load_embedding(TOKEN, sd_file)
    session.load_embedding(TOKEN, sd_file)
    session.load_embedding(TOKEN, sd_file)  # the same file again: nothing to do
    with pytest.raises(EmbeddingError, match="already names the embedding"):
        session.load_embedding(TOKEN, wide)


def test_cli_records_the_embedding_and_from_png_needs_it(tiny_sd_dir, sd_file, tmp_path, capsys):
    from negprompt.interfaces.png import read_png_settings

    out = tmp_path / "neg.png"
    base = ["generate", "a cat", "-n", NEGATIVE, "--steps", "2", "--size", "32", "--model", str(tiny_sd_dir), "-q"]
    assert main([*base, "--embedding", f"{TOKEN}={sd_file}", "--out", str(out)]) == 0
    capsys.readouterr()
    settings, _ = read_png_settings(out)
    assert settings.embeddings and settings.embeddings[0][:2] == (TOKEN, sd_file.name)
    assert f'TI hashes: "{TOKEN}: {settings.embeddings[0][2]}"' in settings.infotext(0)
    again = tmp_path / "again.png"
    code = main(["generate", "--from-png", str(out), "-q", "--out", str(again)])
    assert_usage_error(code, capsys, f"embedding '{TOKEN}'", again)
    assert (
        main(["generate", "--from-png", str(out), "--embedding", f"{TOKEN}={sd_file}", "-q", "--out", str(again)]) == 0
    )
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    wide = tmp_path / "wide.safetensors"
    save_file({"emb_params": vectors(1, 768, 0)}, str(wide))
    for bad, message in (
        (f"{TOKEN}={tmp_path / 'x.ckpt'}", "pickle"),
        ("easyneg", "TOKEN=FILE"),
        (f"{TOKEN}={wide}", "width 768"),
        (f"ca={sd_file}", "already in the tokenizer's vocabulary"),
    ):
        target = tmp_path / "bad.png"
        assert_usage_error(main([*base, "--embedding", bad, "--out", str(target)]), capsys, message, target)


def test_session_refuses_a_spec_whose_embedding_is_not_loaded(sd_file):
    loaded = Session(build_tiny_sd(seed=0))
    loaded.load_embedding(TOKEN, sd_file)
    spec = loaded.spec("a cat", NEGATIVE, steps=2, size=32)
    with pytest.raises(SettingsError, match="has not loaded"):
        Session(build_tiny_sd(seed=0)).run(spec)
