"""Hostile PNGs for --from-png, prompts, study specs and options (issue 33, items 7 and 8), written here, and
hypothesis fuzz of PNG text chunks, model_index.json and study YAML: every input is read or refused with one
line (exit 2), never a traceback, a warning or a file left behind. All are refused before a model loads."""

from __future__ import annotations

import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import pytest
from helpers import assert_usage_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from negprompt.analysis.spec import SpecError, StudySpec, load_spec, parse_spec
from negprompt.errors import NegpromptError
from negprompt.guidance import syntax
from negprompt.guidance.plan import Guidance, Term
from negprompt.interfaces.cli import main
from negprompt.interfaces.png import png_info, read_png_settings
from negprompt.limits import MAX_PROMPT_NESTING, MAX_SETTINGS_BYTES
from negprompt.models.loading import load_components, part_names
from negprompt.runspec import RunSpec, SettingsError

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same cases on every run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SPEC = RunSpec(
    model="shapes", guidance=Guidance("sd", Term("a red circle"), (Term("a hat"),)), steps=2, height=32, width=32
)
RECORD = json.dumps({"index": 0, "settings": SPEC.to_json()})
BASE_SPEC = (Path(__file__).resolve().parent.parent / "negprompt" / "studies" / "shapes.yaml").read_text()


def one_line(error: BaseException) -> None:
    assert isinstance(error, NegpromptError), repr(error)
    assert str(error) and len(str(error).splitlines()) == 1, str(error)


# ---------------------------------------------------------------- PNGs, chunk by chunk


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(chunks: list[bytes], width: int = 1, height: int = 1, pixels: bool = True) -> bytes:
    """A PNG of the given header size with ``chunks`` before its pixels (a 1×1 image's, if ``pixels``)."""
    body = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    body += b"".join(chunks)
    if pixels:
        body += chunk(b"IDAT", zlib.compress(b"\x00" + b"\x00" * 3 * min(width, 1)))
    return body + chunk(b"IEND", b"")


def text_chunk(text: bytes, kind: bytes = b"tEXt", keyword: bytes = b"negprompt") -> bytes:
    if kind == b"zTXt":
        return chunk(kind, keyword + b"\0\0" + zlib.compress(text))
    if kind == b"iTXt":
        return chunk(kind, keyword + b"\0\1\0\0\0" + zlib.compress(text))
    return chunk(kind, keyword + b"\0" + text)


def bomb(kind: bytes) -> bytes:
    """50 MB of spaces in a text chunk of 50 kB: Pillow raised ValueError (a traceback)."""
    return png_bytes([text_chunk(b" " * 50_000_000, kind)])


HOSTILE_PNGS = {
    "JSON arrays 200 000 deep": (png_bytes([text_chunk(b"[" * 200_000)]), "nests JSON too deeply"),
    "JSON objects 100 000 deep": (png_bytes([text_chunk(b'{"a":' * 100_000)]), "nests JSON too deeply"),
    "a zTXt decompression bomb": (bomb(b"zTXt"), f"holds over {MAX_SETTINGS_BYTES} bytes"),
    "an iTXt decompression bomb": (bomb(b"iTXt"), f"holds over {MAX_SETTINGS_BYTES} bytes"),
    "a 3 MB text chunk": (png_bytes([text_chunk(b" " * 3_000_000)]), "negprompt writes settings of at most"),
    "a 30 000² header, no settings": (png_bytes([], 30_000, 30_000), "carries no negprompt settings"),
    "70 MB of other text chunks": (
        png_bytes([text_chunk(b" " * 900_000, keyword=b"k%d" % i) for i in range(80)]),
        "carries no negprompt settings",
    ),
    "a damaged checksum": (png_bytes([text_chunk(RECORD.encode())[:-1] + b"\0"]), "fails its checksum"),
    "cut inside its chunk": (png_bytes([text_chunk(RECORD.encode())])[:60], "is a truncated PNG"),
    "cut before IEND": (png_bytes([text_chunk(RECORD.encode())])[:-12], "is a truncated PNG"),
    "iTXt not UTF-8": (png_bytes([chunk(b"iTXt", b"negprompt\0\0\0\0\0\xff{")]), "is not UTF-8 text"),
    "iTXt cut short": (png_bytes([chunk(b"iTXt", b"negprompt\0\0")]), "iTXt chunk is cut short"),
    "zTXt not zlib": (png_bytes([chunk(b"zTXt", b"negprompt\0\0not zlib")]), "does not decompress"),
    "zTXt cut short": (
        png_bytes([chunk(b"zTXt", b"negprompt\0\0" + zlib.compress(RECORD.encode())[:-20])]),
        "compressed text is cut short",
    ),
    "index Infinity": (
        png_bytes([text_chunk(RECORD.replace('"index": 0', '"index": Infinity').encode())]),
        "index Infinity is not",
    ),
    "index true": (png_bytes([text_chunk(RECORD.replace('"index": 0', '"index": true').encode())]), "index true"),
    "index a list": (png_bytes([text_chunk(RECORD.replace('"index": 0', '"index": [0]').encode())]), "index [0]"),
    "a JPEG": (b"\xff\xd8\xff\xe0" + b"\0" * 64, "lacks the PNG signature"),
}


@pytest.mark.parametrize("case", HOSTILE_PNGS)
def test_a_crafted_png_is_one_line_before_any_model_loads(case, tmp_path, capsys, monkeypatch):
    content, message = HOSTILE_PNGS[case]
    source = tmp_path / "crafted.png"
    source.write_bytes(content)
    import negprompt.session as session_module

    monkeypatch.setattr(session_module, "load_components", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out" / "again.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning was a second stderr line
        code = main(["generate", "--from-png", str(source), "-q", "--out", str(out)])
    assert_usage_error(code, capsys, message, out, out.parent)


def test_a_png_folder_is_a_user_error(tmp_path, capsys):
    folder = tmp_path / "image.png"
    folder.mkdir()
    code = main(["generate", "--from-png", str(folder), "-q", "--out", str(tmp_path / "o.png")])
    assert_usage_error(code, capsys, "is a folder", tmp_path / "o.png")


@pytest.mark.parametrize("kind", [b"tEXt", b"zTXt", b"iTXt"])
@pytest.mark.parametrize("where", ["before the pixels", "after the pixels"])
def test_settings_are_read_from_any_text_chunk_without_decoding_the_pixels(kind, where, tmp_path):
    """Compressed and international chunks, before or after IDAT; a 30 000² header is never decoded."""
    settings_chunk = text_chunk(RECORD.encode(), kind)
    content = png_bytes([] if where == "after the pixels" else [settings_chunk], 30_000, 30_000)
    if where == "after the pixels":
        content = content[:-12] + settings_chunk + content[-12:]
    path = tmp_path / "big.png"
    path.write_bytes(content)
    assert read_png_settings(path) == (SPEC, 0)


def test_a_png_written_by_negprompt_reads_back(tmp_path):
    path = tmp_path / "mine.png"
    Image.new("RGB", (32, 32)).save(path, pnginfo=png_info(SPEC, 0))
    assert read_png_settings(path) == (SPEC, 0)


CHUNK_KINDS = st.sampled_from([b"tEXt", b"zTXt", b"iTXt", b"IDAT", b"eXIf"])
JSON_BYTES = st.text(alphabet='[]{}":,0123456789.eE-+ nulltruefalseNaIinfy\\u', max_size=60).map(str.encode)


@st.composite
def text_chunks(draw) -> bytes:
    """A chunk as it is written, or damaged: kind, keyword, compression, content (the real record, cut and
    continued with JSON punctuation, nested brackets or random bytes), the iTXt fields, the checksum."""
    kind = draw(CHUNK_KINDS)
    keyword = draw(st.sampled_from([b"negprompt\0", b"negprompt\0", b"parameters\0", b"", b"negprompt"]))
    content = draw(
        st.one_of(
            st.just(RECORD.encode()),
            st.builds(lambda cut, junk: RECORD.encode()[:cut] + junk, st.integers(0, len(RECORD)), JSON_BYTES),
            JSON_BYTES,
            st.integers(1, 3000).map(lambda depth: b"[" * depth + b"]" * depth),
            st.binary(max_size=80),
        )
    )
    compress = kind in (b"zTXt", b"iTXt") and draw(st.booleans())
    if compress:
        packed = zlib.compress(content)
        content = packed[: draw(st.integers(0, len(packed)))]  # whole or cut short
    if kind == b"zTXt":
        content = draw(st.sampled_from([b"\0", b"\1", b""])) + content
    elif kind == b"iTXt":
        fields = draw(st.sampled_from([b"\0\0", b"en\0x\0", b"\0", b""]))
        content = bytes([compress, 0]) + fields + content
    written = chunk(kind, keyword + content)
    if draw(st.integers(0, 9)) == 0:
        written = written[:-1] + bytes([written[-1] ^ 1])  # a damaged checksum
    return written


@FUZZ
@given(chunks=st.lists(text_chunks(), max_size=3), cut=st.one_of(st.none(), st.integers(0, 400)))
def test_fuzz_png_text_chunks_parse_or_raise_one_line(chunks, cut, tmp_path_factory):
    content = png_bytes(chunks)
    path = tmp_path_factory.mktemp("png") / "fuzz.png"
    path.write_bytes(content if cut is None else content[:cut])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            spec, index = read_png_settings(path)
        except SettingsError as error:
            one_line(error)
        else:
            assert isinstance(spec, RunSpec) and 0 <= index < len(spec.seeds)


# ---------------------------------------------------------------- model_index.json, fuzzed

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
PART_ENTRIES = st.one_of(
    st.just(["diffusers", "UNet2DConditionModel"]),
    st.just(["transformers", "CLIPTextModel"]),
    st.just([None, None]),
    st.lists(st.one_of(st.none(), st.text(max_size=8), st.integers()), max_size=3),
    JSON_VALUES,
)
INDEX_KEYS = st.sampled_from(sorted(part_names()) + ["_class_name", "force_zeros_for_empty_prompt", "x"])
INDEXES = st.one_of(
    st.dictionaries(INDEX_KEYS, PART_ENTRIES, max_size=8).map(lambda index: json.dumps(index).encode()),
    st.dictionaries(
        st.just("_class_name"),
        st.sampled_from(["StableDiffusionPipeline", "StableDiffusionXLPipeline", "FluxPipeline", "NegpromptPipeline"]),
        min_size=1,
    ).flatmap(
        lambda head: st.dictionaries(INDEX_KEYS, PART_ENTRIES, max_size=6).map(
            lambda rest: json.dumps({**rest, **head}).encode()
        )
    ),
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=60),
    st.integers(1, 5000).map(lambda depth: b'{"unet": ' + b"[" * depth),
)


@FUZZ
@given(content=INDEXES)
def test_fuzz_model_index_loads_or_raises_one_line(content, tmp_path_factory):
    """Every part folder is there but empty: whatever the index says, the load stops at it or at a part."""
    model = tmp_path_factory.mktemp("model")
    for part in part_names():
        (model / part).mkdir()
    (model / "model_index.json").write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(NegpromptError) as error:
            load_components(model)
    one_line(error.value)


# ---------------------------------------------------------------- prompts


def nested(opener: str, closer: str, depth: int) -> str:
    return opener * depth + "a red circle" + closer * depth


@pytest.mark.parametrize(
    "prompt",
    [nested("(", ")", 1000), nested("[", "]", 1000), "[" * 1000 + "a red circle", nested("[", ":hat:0.5]", 1000)],
    ids=["(1000)", "[1000]", "1000 unclosed [", "1000 nested edits"],
)
@pytest.mark.parametrize("where", ["prompt", "--negative"])
def test_a_prompt_nested_1000_deep_is_one_line(prompt, where, tmp_path, capsys):
    out = tmp_path / "out.png"
    argv = [prompt] if where == "prompt" else ["a red circle", "--negative", prompt]
    code = main(["generate", *argv, "--steps", "2", "-q", "--out", str(out)])
    assert_usage_error(code, capsys, f"brackets nest deeper than {MAX_PROMPT_NESTING} levels", out)


def test_the_nesting_bound_counts_brackets_not_escapes():
    assert syntax.parse(nested("[", "]", MAX_PROMPT_NESTING))  # weight 1/1.1^32, within the bound
    assert syntax.parse("\\(" * 1000 + "a red circle")  # escaped brackets are text
    with pytest.raises(syntax.PromptSyntaxError, match="nest deeper"):
        syntax.parse(nested("[", "]", MAX_PROMPT_NESTING + 1))


@pytest.mark.parametrize("where", ["prompt", "--negative", "--prompt-2"])
def test_a_byte_that_is_not_utf8_in_argv_is_one_line(where, tmp_path, capsys):
    """Python keeps an argv byte 0xFF as the lone surrogate U+DCFF (surrogateescape): no tokenizer takes it."""
    prompt = os.fsdecode(b"a red \xff circle")
    argv = [prompt] if where == "prompt" else ["a red circle", where, prompt]
    out = tmp_path / "out.png"
    code = main(["generate", *argv, "--steps", "2", "-q", "--out", str(out)])
    assert_usage_error(code, capsys, "holds the byte 0xff at character 7, which is not UTF-8 text", out)


def test_a_lone_surrogate_from_a_png_or_spec_is_refused_before_any_tokenizer():
    """Settings read from JSON (a PNG's "\\udcff") reach the encoder through plain_text and text_at."""
    for read in (syntax.plain_text, lambda text: syntax.text_at(text, 0, 10), syntax.parse):
        with pytest.raises(syntax.PromptSyntaxError, match="holds the byte 0xff") as error:
            read("a hat \udcff")
        one_line(error.value)


# ---------------------------------------------------------------- study specs


def spec_with(old: str, new: str) -> str:
    assert old in BASE_SPEC
    return BASE_SPEC.replace(old, new, 1)


HOSTILE_SPECS = {
    "a python tag": (
        spec_with("name: shapes", "name: !!python/object/apply:os.system ['touch PWNED']"),
        "python/object/apply",
    ),
    "a python name": (spec_with("name: shapes", "name: !!python/name:os.system"), "is not accepted"),
    "a custom tag": (spec_with("steps: 30", "steps: !mine 30"), "the tag '!mine' is not accepted"),
    "a tagged key": (spec_with("steps: 30", "!mine steps: 30"), "the tag '!mine' is not accepted"),
    "a tagged pair": (spec_with("  - {group: noun", "  - !!python/object:x {group: noun"), "is not accepted"),
    "a merge key": (spec_with("steps: 30", "<<: {steps: 30}"), "is not accepted"),
    "!!int abc": (spec_with("steps: 30", "steps: !!int abc"), "field 'steps' must be a int"),
    "a list as key": (spec_with("steps: 30", "? [a, b]\n: 30"), "a key must be a plain name"),
    "a key twice": (BASE_SPEC + "steps: 31\n", "key 'steps' appears twice"),
    "lists 5000 deep": ("pairs: " + "[" * 5000 + "]" * 5000, "nest too deeply"),
    "a NUL in the name": (spec_with("name: shapes", 'name: "sha\\0pes"'), "holds a character that is not text"),
    "a lone surrogate": (
        spec_with("negative: a hat}", 'negative: "a \\udcff hat"}'),
        "holds a character that is not text",
    ),
    "a seed above 2^64": (spec_with("seeds: [0,", "seeds: [18446744073709551616,"), "field 'seeds' must be in 0–"),
    "a negative seed": (spec_with("seeds: [0,", "seeds: [-1,"), "field 'seeds' must be in 0–"),
    "scale nan": (spec_with("scale: 7.5", "scale: .nan"), "field 'scale' must be in -100–100"),
    "scale 1.0e+400": (spec_with("scale: 7.5", "scale: 1.0e+400"), "field 'scale' must be in -100–100"),
    "size 10^8": (spec_with("steps: 30", "steps: 30\nsize: 100000000"), "field 'size' must be in 1–8192"),
}


@pytest.mark.parametrize("case", HOSTILE_SPECS)
def test_a_hostile_study_spec_is_one_line_and_creates_nothing(case, tmp_path, capsys):
    text, message = HOSTILE_SPECS[case]
    spec = tmp_path / "spec.yaml"
    spec.write_text(text, encoding="utf-8", errors="surrogatepass")
    out = tmp_path / "results"
    code = main(["study", str(spec), "-q", "--out", str(out)])
    assert_usage_error(code, capsys, message, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]  # and no PWNED


@pytest.mark.parametrize(
    "content, message",
    [
        (
            BASE_SPEC.replace("name: shapes", "name: café").encode("latin-1"),
            ":4: the spec is not UTF-8 text (byte 0xe9)",
        ),
        (BASE_SPEC.encode("utf-16"), ":1: the spec is not UTF-8 text (byte 0xff)"),
    ],
    ids=["Latin-1", "UTF-16"],
)
def test_a_spec_that_is_not_utf8_is_one_line(content, message, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(content)
    out = tmp_path / "results"
    code = main(["study", str(spec), "-q", "--out", str(out)])
    assert_usage_error(code, capsys, message, out)


def test_aliases_still_work_and_a_recursive_alias_cannot_loop():
    assert parse_spec(spec_with("steps: 30", "steps: &n 30\nmap_size: *n")).map_size == 30
    with pytest.raises(SpecError) as error:
        parse_spec(spec_with("seeds: [0,", "seeds: &s [*s, 0,"))
    one_line(error.value)


YAML_PIECES = st.sampled_from(
    [
        "!!python/object/apply:os.system ['true']",
        "!!python/name:os.system",
        "!!binary aGF0",
        "!!set {a: null}",
        "!!omap [a: 1]",
        "!mine x",
        "&a [1, *a]",
        "*undefined",
        "[" * 60,
        "{" * 60,
        "? [k]\n: v",
        "<<: {steps: 3}",
        "steps: 2\nsteps: 3",
        '"\\udcff"',
        '"\\0"',
        "\t",
        "---\n---",
        "%YAML 1.1",
        "2001-12-14",
        ".nan",
        "-.inf",
        "0x1F",
        "1e400",
        "99999999999999999999999",
        "~",
        "é",
    ]
)


@st.composite
def hostile_yaml(draw) -> bytes:
    """The built-in spec with a few lines or values replaced by hostile YAML, as UTF-8 or as raw bytes."""
    lines = BASE_SPEC.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        piece = draw(YAML_PIECES)
        key = lines[i].split(":")[0] if ":" in lines[i] else None
        lines[i] = f"{key}: {piece}" if key and draw(st.booleans()) else piece
    text = "\n".join(lines).encode("utf-8", errors="surrogatepass")
    if draw(st.integers(0, 5)) == 0:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.binary(min_size=1, max_size=4)) + text[at:]
    return text


@FUZZ
@given(content=hostile_yaml())
def test_fuzz_study_yaml_parses_or_raises_one_line(content, tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "spec.yaml"
    path.write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            spec = load_spec(path)
        except SpecError as error:
            one_line(error)
        else:
            assert isinstance(spec, StudySpec)
            assert all(isinstance(seed, int) for seed in spec.seeds) and spec.pairs


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    "value, message",
    [
        ("nan", "'nan' is not a finite number"),
        ("-1", "'-1' must be above 0"),
        ("0", "'0' must be above 0"),
        ("1e308", "'1e308' MiB is beyond any machine's memory"),
    ],
)
def test_attend_memory_limit_is_checked_when_parsed(value, message, tmp_path, capsys):
    """-1 and 0 were refused only after the model loaded; 1e308 overflowed into a traceback."""
    out = tmp_path / "maps"
    code = main(["attend", "a red circle", "--memory-limit", value, "--out", str(out)])
    assert_usage_error(code, capsys, f"argument --memory-limit: {message}", out)
