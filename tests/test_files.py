"""The one way files are written (negprompt.files) and a model's negprompt.json read as typed declarations."""

from __future__ import annotations

import json
import os
from dataclasses import fields

import pytest

from negprompt.files import append_text, drop_torn_line, is_temporary, write_atomically, write_json, write_text
from negprompt.models.components import Components
from negprompt.models.declarations import _ACCEPTED, Declarations, DeclarationsError
from negprompt.models.loading import BUNDLED_MODELS, ModelLoadError, read_declarations

# ---------------------------------------------------------------- files


def test_a_failed_write_leaves_every_file_as_it_was_and_no_temporary(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text("old a")

    def write_one(final, temporary):
        if final == second:
            raise OSError(28, "No space left on device")
        temporary.write_text("new a")

    with pytest.raises(OSError, match="No space"):
        write_atomically([first, second], write_one)
    assert first.read_text() == "old a" and not second.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_written_files_have_the_umask_mode_and_the_exact_text(tmp_path):
    mask = os.umask(0o027)
    try:
        path = write_json(tmp_path / "deep" / "x.json", {"b": [1, 2], "a": 0.5}, indent=1)
    finally:
        os.umask(mask)
    assert path.read_text() == json.dumps({"b": [1, 2], "a": 0.5}, indent=1) + "\n"
    assert path.stat().st_mode & 0o777 == 0o640
    assert write_text(tmp_path / "t.txt", "é\n").read_text() == "é\n"


def test_appends_and_a_torn_line_cut(tmp_path):
    path = tmp_path / "log.jsonl"
    append_text(path, '{"step": 1}\n')
    append_text(path, '{"step": 2}\n{"st', sync=False)
    drop_torn_line(path)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    drop_torn_line(tmp_path / "missing.jsonl")  # nothing to cut


def test_temporaries_are_known_by_name(tmp_path):
    final = tmp_path / "spec.json"
    assert is_temporary(tmp_path / ".spec.json.k2j4x9.tmp", final)
    assert not is_temporary(tmp_path / ".spec.json.k2j4x9.tmp", tmp_path / "other.json")
    assert not is_temporary(final) and not is_temporary(tmp_path / "notes.tmp")


# ---------------------------------------------------------------- negprompt.json


def test_every_field_has_a_check():
    assert list(_ACCEPTED) == [f.name for f in fields(Declarations)]


@pytest.mark.parametrize("name", sorted(BUNDLED_MODELS))
def test_the_bundled_declarations_read_and_write_back_byte_for_byte(name):
    path = BUNDLED_MODELS[name] / "negprompt.json"
    declarations = read_declarations(path.parent)
    assert declarations.region_finder == "shapes" and declarations.max_sigma == 40.0
    assert declarations.demo_pairs[0] == ("a red circle", "a hat")
    assert json.dumps(declarations.to_json(), indent=2) + "\n" == path.read_text()
    assert dict(declarations) == json.loads(path.read_text())  # the mapping Session.defaults merges


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"steps": "20"}', "steps must be a whole number of steps, at least 1, got '20'"),
        ('{"scale": true}', "scale must be a number"),
        ('{"max_sigma": -1}', "max_sigma must be a positive number"),
        ('{"demo_pairs": [["a cat"]]}', "demo_pairs must be a list of [prompt, negative] pairs of texts"),
        ('{"region_finder": 3}', "region_finder must be the name of a region finder"),
        ('{"stesp": 20}', "unknown field 'stesp'; the fields are scheduler, steps, scale"),
        ("[1, 2]", "must hold a JSON object"),
        ("{", "is not valid JSON"),
    ],
)
def test_a_bad_negprompt_json_is_refused_in_one_line(tmp_path, text, message):
    (tmp_path / "negprompt.json").write_text(text)
    with pytest.raises(ModelLoadError) as error:
        read_declarations(tmp_path)
    assert message in str(error.value) and str(tmp_path) in str(error.value)
    assert len(str(error.value).splitlines()) == 1


def test_no_file_and_in_memory_mappings(tmp_path, tiny_sd):
    assert read_declarations(tmp_path) == Declarations() and len(Declarations()) == 0
    given = Components(
        tiny_sd.unet, tiny_sd.text_encoder, tiny_sd.tokenizer, tiny_sd.scheduler, declarations={"scale": 5}
    )
    assert given.declarations.scale == 5 and isinstance(given.declarations.scale, int)  # kept as given
    with pytest.raises(DeclarationsError, match="unknown field 'colour'"):
        Components(tiny_sd.unet, tiny_sd.text_encoder, tiny_sd.tokenizer, tiny_sd.scheduler, declarations={"colour": 1})
