"""Textual-inversion embeddings ("negative embeddings" such as EasyNegative) from safetensors files.

An embedding is one or more vectors in a text encoder's input space, learned to stand for a concept
(Gal et al. 2022). It is used through a token name the user picks: the token (and, for n vectors,
``token_1`` … ``token_{n-1}``) is added to the tokenizer and its vectors to the text encoder's input
embeddings, as diffusers' ``load_textual_inversion`` does; in a prompt the token stands for all its
vectors. Files people share hold, in safetensors:

- SD 1.x/2.x, one text encoder: a single tensor (n, D) or (D,) under any key (diffusers writes the
  token, AUTOMATIC1111 ``emb_params``);
- SDXL, two text encoders: ``clip_l`` (n, 768) and ``clip_g`` (n, 1280).

Pickled files (``.pt``, ``.bin``, ``.ckpt`` …) are refused: unpickling runs code from the file.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from negprompt.errors import NegpromptError
from negprompt.limits import MAX_EMBEDDING_VECTORS, MAX_EMBEDDING_WIDTH

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
SDXL_KEYS = ("clip_l", "clip_g")  # first and second text encoder
TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class EmbeddingError(NegpromptError):
    """An embedding file or token name that cannot be loaded."""


@dataclass(frozen=True)
class Embedding:
    """A loaded embedding: the token it is used by, its file, the file's short hash and its vector count."""

    token: str
    file: str
    sha256: str  # first 10 hex digits of the file's SHA-256 (AUTOMATIC1111's "TI hashes")
    vectors: int

    def to_json(self) -> dict:
        return {"token": self.token, "file": self.file, "sha256": self.sha256, "vectors": self.vectors}


def check_embedding_source(token: str, path: str | Path) -> Path:
    """Checks what can be checked without a model: the token's form and that ``path`` is a safetensors file."""
    if not TOKEN_PATTERN.match(token or ""):
        raise EmbeddingError(
            f"embedding token {token!r} must be one word of letters, digits, '_', '.' or '-' (e.g. easynegative)"
        )
    if re.search(r"_\d+$", token):
        raise EmbeddingError(
            f"embedding token {token!r} ends in _<number>, which names the extra vectors; pick another"
        )
    path = Path(path).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise EmbeddingError(
            f"{path.name} is a pickle ({path.suffix}); negprompt reads embeddings from .safetensors only, because "
            "loading a pickle can run arbitrary code: convert it to safetensors first"
        )
    if path.suffix.lower() != ".safetensors":
        raise EmbeddingError(f"{path} is not a .safetensors file; embeddings are read from safetensors only")
    if not path.is_file():
        raise EmbeddingError(f"embedding file {path} does not exist")
    return path


def read_vectors(path: Path) -> dict[str, Any]:
    """The tensors of a safetensors embedding file, by key, on the CPU, in float32.

    Shapes are checked from the file's header before any tensor is read: at most
    ``MAX_EMBEDDING_VECTORS`` vectors (``negprompt.limits``: more never fit in a prompt) of at most
    ``MAX_EMBEDDING_WIDTH`` numbers. Values must be finite: a NaN vector would make every image black."""
    import torch
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
            for key, shape in shapes.items():  # raises EmbeddingError, a ValueError: not caught below
                check_embedding_shape(path, key, shape)
            tensors = {key: handle.get_tensor(key) for key in shapes}
    except EmbeddingError:
        raise
    except (SafetensorError, OSError, ValueError) as error:
        text = str(error).strip().splitlines()
        raise EmbeddingError(
            f"cannot read {path} as safetensors ({text[0] if text else type(error).__name__})"
        ) from None
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise EmbeddingError(
                f"{path.name}: tensor {key!r} holds {tensor.dtype} values; embeddings hold real numbers"
            )
        tensors[key] = tensor.float()
        if not torch.isfinite(tensors[key]).all():
            bad = int((~torch.isfinite(tensors[key])).sum())
            raise EmbeddingError(
                f"{path.name}: tensor {key!r} holds {bad} non-finite value(s) (NaN or infinity) of {tensor.numel()}; "
                "the file is damaged: an embedding holds finite numbers"
            )
    return tensors


def check_embedding_shape(path: Path, key: str, shape: Sequence[int]) -> None:
    """Refuses, from the header alone, a tensor that cannot be an embedding's vectors: not (vectors, width)
    or (width,), more than ``MAX_EMBEDDING_VECTORS`` vectors or wider than ``MAX_EMBEDDING_WIDTH``."""
    if len(shape) not in (1, 2):
        raise EmbeddingError(
            f"{path.name}: embedding tensors must be (vectors, width), got {key!r} of shape {tuple(shape)}"
        )
    vectors, width = (1, shape[0]) if len(shape) == 1 else (shape[0], shape[1])
    if vectors > MAX_EMBEDDING_VECTORS:
        raise EmbeddingError(
            f"{path.name}: {key!r} holds {vectors} vectors; an embedding holds at most {MAX_EMBEDDING_VECTORS} "
            "(a CLIP prompt has 77 tokens with its start and end, so more never fit)"
        )
    if width > MAX_EMBEDDING_WIDTH:
        raise EmbeddingError(
            f"{path.name}: {key!r} has vectors of width {width}; text encoders take at most {MAX_EMBEDDING_WIDTH}"
        )


def vectors_per_encoder(tensors: dict[str, Any], encoders: int, path: Path) -> list[Any]:
    """The vectors (n, D) for each of the model's ``encoders`` text encoders, in order."""
    if encoders == 2:
        if not all(key in tensors for key in SDXL_KEYS):
            raise EmbeddingError(
                f"{path.name} holds {', '.join(sorted(tensors)) or 'no tensors'}; an SDXL embedding holds clip_l and "
                "clip_g vectors (one set per text encoder)"
            )
        chosen = [tensors[key] for key in SDXL_KEYS]
    else:
        if any(key in tensors for key in SDXL_KEYS):
            raise EmbeddingError(
                f"{path.name} is an SDXL embedding (clip_l, clip_g); this model has one text encoder: use an "
                "SD 1.x/2.x embedding"
            )
        if len(tensors) != 1:
            raise EmbeddingError(
                f"{path.name} holds {len(tensors)} tensors ({', '.join(sorted(tensors))}); an SD 1.x/2.x embedding "
                "holds one"
            )
        chosen = list(tensors.values())
    vectors = [v[None] if v.dim() == 1 else v for v in chosen]
    if any(v.dim() != 2 or v.shape[0] == 0 for v in vectors):
        raise EmbeddingError(
            f"{path.name}: embedding tensors must be (vectors, width), got {[tuple(v.shape) for v in chosen]}"
        )
    if len({v.shape[0] for v in vectors}) != 1:
        raise EmbeddingError(f"{path.name}: clip_l and clip_g hold different numbers of vectors")
    return vectors


def file_digest(path: str | Path) -> str:
    """The first 10 hex digits of the file's SHA-256 (as AUTOMATIC1111's "TI hashes")."""
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()[:10]


def token_names(token: str, count: int) -> list[str]:
    """The tokens of an embedding of ``count`` vectors: ``token``, ``token_1`` … (diffusers' names)."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def add_embedding(components: Any, token: str, path: str | Path) -> Embedding:
    """Adds the embedding in ``path`` to every text encoder of ``components`` under ``token`` (in place).

    Errors (nothing is changed then): a pickle or a missing file, a token already in a vocabulary,
    an SD 1.x/2.x file on SDXL or the reverse, vectors whose width is not the encoder's.
    """
    import torch

    path = check_embedding_source(token, path)
    pairs = [(components.tokenizer, components.text_encoder)]
    if getattr(components, "text_encoder_2", None) is not None:
        pairs.append((components.tokenizer_2, components.text_encoder_2))
    vectors = vectors_per_encoder(read_vectors(path), len(pairs), path)
    names = token_names(token, vectors[0].shape[0])
    for (tokenizer, encoder), v in zip(pairs, vectors):
        room = tokenizer.model_max_length - 2  # the prompt's start and end tokens
        if len(names) > room:
            raise EmbeddingError(
                f"{path.name} holds {len(names)} vectors, but this model's prompts hold at most {room} tokens "
                "(besides the start and end): it could never be used"
            )
        width = encoder.get_input_embeddings().weight.shape[-1]
        if v.shape[-1] != width:
            raise EmbeddingError(
                f"{path.name} has vectors of width {v.shape[-1]}, but this model's text encoder takes {width}: "
                "it was made for another model"
            )
        taken = [name for name in names if name in tokenizer.get_vocab()]
        if taken:
            raise EmbeddingError(
                f"token {taken[0]!r} is already in the tokenizer's vocabulary; pick another name for the embedding"
            )
    for (tokenizer, encoder), v in zip(pairs, vectors):
        encoder.resize_token_embeddings(len(tokenizer) + len(names))
        weight = encoder.get_input_embeddings().weight
        for name, vector in zip(names, v):
            tokenizer.add_tokens(name)
            with torch.no_grad():
                weight[tokenizer.convert_tokens_to_ids(name)] = vector.to(weight.dtype)
    embedding = Embedding(token, path.name, file_digest(path), len(names))
    components.embeddings[token] = embedding
    return embedding


def expand_embeddings(tokenizer: Any, text: str) -> str:
    """``text`` with each multi-vector embedding token written out as all its tokens (``tok`` → ``tok tok_1 tok_2``),
    as diffusers' ``maybe_convert_prompt`` does; text without added tokens is returned as it is."""
    added = getattr(tokenizer, "added_tokens_encoder", None) or {}
    if not text or not any(f"{token}_1" in added for token in added):
        return text
    for token in sorted(set(tokenizer.tokenize(text))):
        if token in added and f"{token}_1" in added:
            count = 1
            while f"{token}_{count}" in added:
                count += 1
            text = text.replace(token, " ".join(token_names(token, count)))
    return text


def embedding_base(tokenizer: Any, token: str) -> tuple[str, bool] | None:
    """For an added embedding token: (the embedding's token name, whether ``token`` continues it, i.e. is
    ``name_<i>``); None for any other token."""
    added = getattr(tokenizer, "added_tokens_encoder", {})
    if token not in added or token in tokenizer.all_special_tokens:
        return None
    match = re.match(r"^(.+)_(\d+)$", token)
    if match and match.group(1) in added:
        return match.group(1), True
    return token, False
