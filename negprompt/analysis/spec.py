"""Study specifications (YAML): prompt pairs in groups, seeds, sampler settings, model.

    name: shapes-world
    model: shapes            # a diffusers directory, a cached model id, or "shapes"
    scheduler: default
    steps: 30
    scale: 7.5
    seeds: [0, 1, 2]
    pairs:
      - {group: noun, prompt: a red circle, negative: a hat}
      - {group: adjective, prompt: a blue square, negative: striped, word: striped, related: square}

``word`` is the negative word whose strength is measured (default: the negative prompt's last
content word); ``related`` overrides the automatic r(i). Errors name the line of the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from negprompt.errors import NegpromptError
from negprompt.limits import MAX_FRAMES, MAX_IMAGES, MAX_SCALE, MAX_SEED, MAX_SIDE, MAX_STEPS
from negprompt.runsettings import RunSettings

TOP_KEYS = {"name", "model", "scheduler", "steps", "scale", "seeds", "size", "frames", "map_size", "pairs", "rule"}
STUDY_RULES = ("sd", "nag", "vsf")  # rules with one negative whose attention the capture records
REQUIRED_TOP = {"name", "steps", "seeds", "pairs"}
PAIR_KEYS = {"group", "prompt", "negative", "word", "related"}
REQUIRED_PAIR = {"group", "prompt", "negative"}
WORD = re.compile(r"[^\W_]+")  # a run of letters and digits
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "studies"


def prompt_words(text: str) -> list[str]:
    """The words of a prompt, lower-case, without punctuation ("trees, fog." → trees, fog): a CLIP tokenizer
    makes punctuation tokens of their own. The run checks each word against the model's tokenizer
    before any work (``negprompt.analysis.study.check_study``)."""
    return [w.lower() for w in WORD.findall(text)]


class SpecError(NegpromptError):
    """A study spec that cannot run."""


@dataclass(frozen=True)
class Pair:
    group: str
    prompt: str
    negative: str
    word: str
    related: str | None = None
    line: int = 0

    @property
    def key(self) -> str:
        return f"{self.prompt} | {self.negative} | {self.word}"


@dataclass(frozen=True)
class StudySpec:
    name: str
    steps: int
    seeds: tuple[int, ...]
    pairs: tuple[Pair, ...]
    model: str = "shapes"
    scheduler: str = "default"
    scale: float = 7.5
    size: int | None = None
    map_size: int | None = None
    rule: str = "sd"  # how the negative acts: rule (9), or inside attention (nag, vsf)
    frames: int | None = None  # a video model's frame count (None: the model's default; images: 1)
    source: str = field(default="", compare=False)

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("source")
        if self.rule == "sd":  # specs written before the field keep their fingerprint
            data.pop("rule")
        if self.frames is None:  # specs written before the field keep their fingerprint
            data.pop("frames")
        for pair in data["pairs"]:
            pair.pop("line")
        data["seeds"] = list(self.seeds)
        return data

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def run_settings(self, pair: Pair) -> RunSettings:
        """The run of one pair: every seed in one batch, under the study's rule and sampler settings."""
        return RunSettings(
            pair.prompt,
            pair.negative,
            rule=self.rule,
            scale=self.scale,
            steps=self.steps,
            scheduler=self.scheduler,
            seeds=self.seeds,
            size=self.size,
            frames=self.frames,
        )


def _where(source: str, node: yaml.Node) -> str:
    return f"{source}:{node.start_mark.line + 1}"


def _mapping(node: yaml.Node, source: str, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise SpecError(f"{_where(source, node)}: {what} must be a mapping of keys to values")
    return {key.value: (key, value) for key, value in node.value}


def _scalar(node: yaml.Node, source: str, name: str, kind: type) -> Any:
    try:
        value = yaml.safe_load(yaml.serialize(node)) if isinstance(node, yaml.ScalarNode) else None
    except (yaml.YAMLError, ValueError):  # e.g. `!!int abc`
        value = None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 2**1000 else math.inf
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is str and not value.strip()):
        raise SpecError(
            f"{_where(source, node)}: field '{name}' must be a {'non-empty string' if kind is str else kind.__name__}"
        )
    if kind is str and not _is_text(value):
        raise SpecError(
            f"{_where(source, node)}: field '{name}' holds a character that is not text (a NUL, another control "
            "character or a byte that is not UTF-8); give plain text"
        )
    return value


def _is_text(value: str) -> bool:
    """Whether ``value`` is text a prompt, a name or a path may hold: encodable as UTF-8, without control
    characters other than tab and line breaks."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not any(unicodedata.category(c) == "Cc" and c not in "\t\n\r" for c in value)


def _in_range(node: yaml.Node, source: str, name: str, value: float, low: float, high: float, why: str) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        bounds = f"{low}–{high}" if isinstance(low, int) and isinstance(high, int) else f"{low:g}–{high:g}"
        raise SpecError(f"{_where(source, node)}: field '{name}' must be in {bounds} ({why}), got {value!r}")


SAFE_TAGS = frozenset(
    f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "seq", "map", "timestamp")
)


def _check_tree(root: yaml.Node, source: str) -> None:
    """Refuses what a spec never needs and a loader could misread: tags other than YAML's plain ones (no
    Python or custom tags), keys that are not plain scalars, and a key given twice in one mapping. Walked
    without recursion; aliases are visited once (a recursive alias cannot loop)."""
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.tag not in SAFE_TAGS:
            raise SpecError(
                f"{_where(source, node)}: the tag {node.tag!r} is not accepted; a spec is plain YAML "
                "(strings, numbers, lists and mappings) without tags"
            )
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for key, value in node.value:
                if not isinstance(key, yaml.ScalarNode):
                    raise SpecError(f"{_where(source, key)}: a key must be a plain name, not a list or mapping")
                if key.value in keys:
                    raise SpecError(f"{_where(source, key)}: key '{key.value}' appears twice in the same mapping")
                keys.add(key.value)
                stack += [key, value]
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value


def _parse_pair(item: yaml.Node, source: str) -> Pair:
    """One pair of the spec: its fields checked, its measured word chosen (the last content word of the
    negative by default) and checked against the prompts."""
    fields = _mapping(item, source, "a pair")
    for key, (key_node, _) in fields.items():
        if key not in PAIR_KEYS:
            raise SpecError(
                f"{_where(source, key_node)}: unknown pair field '{key}'; known: {', '.join(sorted(PAIR_KEYS))}"
            )
    absent = REQUIRED_PAIR - fields.keys()
    if absent:
        raise SpecError(f"{_where(source, item)}: pair lacks field(s) {', '.join(sorted(absent))}")
    pair = {k: _scalar(v, source, k, str) for k, (_, v) in fields.items()}
    words = prompt_words(pair["negative"])
    if not words:
        raise SpecError(f"{_where(source, item)}: the negative prompt {pair['negative']!r} has no word to measure")
    content = [w for w in words if w not in {"a", "an", "the", "and", "with", "of"}] or words
    word = pair.get("word", content[-1]).lower()
    if word not in words:
        raise SpecError(
            f"{_where(source, item)}: word {word!r} is not a word of the negative prompt {pair['negative']!r}"
        )
    related = pair.get("related")
    if related is not None and related.lower() not in prompt_words(pair["prompt"]):
        raise SpecError(
            f"{_where(source, item)}: related word {related!r} is not a word of the prompt {pair['prompt']!r}"
        )
    return Pair(
        pair["group"],
        pair["prompt"],
        pair["negative"],
        word,
        related and related.lower(),
        item.start_mark.line + 1,
    )


def parse_spec(text: str, source: str = "<spec>") -> StudySpec:
    """Parses and validates a spec; every error names the line and field."""
    top = _top_fields(_compose(text, source), source)
    values = _settings(top, source)
    seeds = _seeds(top["seeds"][1], source)
    pairs = _pairs(top["pairs"][1], source)
    return StudySpec(seeds=seeds, pairs=pairs, source=source, **values)


def _compose(text: str, source: str) -> yaml.Node | None:
    """The YAML node tree of ``text`` (None for an empty text); YAML errors name their line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.reader.ReaderError as error:  # a character YAML does not allow (NUL, other controls)
        line = text[: error.position].count("\n") + 1
        raise SpecError(
            f"{source}:{line}: not valid YAML (the character {error.character!r} is not allowed in YAML text)"
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SpecError(f"{source}{line}: not valid YAML ({problem})") from None
    except RecursionError:
        raise SpecError(f"{source}: lists or mappings nest too deeply; a spec nests three levels") from None
    return root


def _top_fields(root: yaml.Node | None, source: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """The spec's fields (name → (key node, value node)), each known, the required ones present, the tree checked."""
    if root is None:
        raise SpecError(f"{source}: the spec is empty; required fields: {', '.join(sorted(REQUIRED_TOP))}")
    _check_tree(root, source)
    top = _mapping(root, source, "the spec")
    for key, (key_node, _) in top.items():
        if key not in TOP_KEYS:
            raise SpecError(
                f"{_where(source, key_node)}: unknown field '{key}'; known fields: {', '.join(sorted(TOP_KEYS))}"
            )
    missing = REQUIRED_TOP - top.keys()
    if missing:
        raise SpecError(f"{source}: missing field(s) {', '.join(sorted(missing))}")
    return top


def _settings(top: dict[str, tuple[yaml.Node, yaml.Node]], source: str) -> dict[str, Any]:
    """The spec's single-valued fields (name, model, scheduler, steps, scale, size, frames, map_size, rule), typed and
    checked in range."""
    values: dict[str, Any] = {}
    for key, kind in (
        ("name", str),
        ("model", str),
        ("scheduler", str),
        ("steps", int),
        ("scale", float),
        ("size", int),
        ("frames", int),
        ("map_size", int),
        ("rule", str),
    ):
        if key in top:
            values[key] = _scalar(top[key][1], source, key, kind)
    if values.get("rule", "sd") not in STUDY_RULES:
        raise SpecError(
            f"{_where(source, top['rule'][1])}: field 'rule' must be one of {', '.join(STUDY_RULES)}, "
            f"got {values['rule']!r}"
        )
    if not 1 <= values["steps"] <= MAX_STEPS:
        raise SpecError(f"{_where(source, top['steps'][1])}: field 'steps' must be in 1–{MAX_STEPS}")
    for key, low, high, why in (
        ("scale", -MAX_SCALE, MAX_SCALE, "a guidance scale"),
        ("size", 1, MAX_SIDE, "pixels"),
        ("frames", 1, MAX_FRAMES, "frames of a video"),
        ("map_size", 1, MAX_SIDE, "pixels of an attention map"),
    ):
        if key in values:
            _in_range(top[key][1], source, key, values[key], low, high, why)
    return values


def _seeds(seeds_node: yaml.Node, source: str) -> tuple[int, ...]:
    """The ``seeds`` field: a non-empty list of distinct 64-bit seeds, at most MAX_IMAGES."""
    if not isinstance(seeds_node, yaml.SequenceNode) or not seeds_node.value:
        raise SpecError(f"{_where(source, seeds_node)}: field 'seeds' must be a non-empty list of integers")
    if len(seeds_node.value) > MAX_IMAGES:
        raise SpecError(
            f"{_where(source, seeds_node)}: field 'seeds' lists {len(seeds_node.value)}; at most {MAX_IMAGES}"
        )
    seeds = tuple(_scalar(n, source, "seeds", int) for n in seeds_node.value)
    for node, seed in zip(seeds_node.value, seeds):
        _in_range(node, source, "seeds", seed, 0, MAX_SEED, "a seed takes 64 bits")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"{_where(source, seeds_node)}: field 'seeds' repeats a seed")
    return seeds


def _pairs(pairs_node: yaml.Node, source: str) -> tuple[Pair, ...]:
    """The ``pairs`` field: a non-empty list of prompt/negative pairs, each key once."""
    if not isinstance(pairs_node, yaml.SequenceNode) or not pairs_node.value:
        raise SpecError(f"{_where(source, pairs_node)}: field 'pairs' must be a non-empty list")
    pairs = [_parse_pair(item, source) for item in pairs_node.value]
    keys = [p.key for p in pairs]
    for pair in pairs:
        if keys.count(pair.key) > 1:
            raise SpecError(f"{source}:{pair.line}: pair {pair.key!r} appears twice")
    return tuple(pairs)


def load_spec(path: str | Path) -> StudySpec:
    """A spec file, or the name of a built-in spec (``shapes``, ``shapes-nag``, ``ban2024-sd2``)."""
    path = Path(path)
    if not path.exists() and (BUILTIN_DIR / f"{path.name}.yaml").exists():
        path = BUILTIN_DIR / f"{path.name}.yaml"
    try:
        data = path.read_bytes()
    except OSError as error:
        builtin = ", ".join(sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml")))
        raise SpecError(f"cannot read spec {str(path)!r} ({error.strerror}); built-in specs: {builtin}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise SpecError(
            f"{path}:{line}: the spec is not UTF-8 text (byte 0x{data[error.start]:02x}); save it as UTF-8"
        ) from None
    return parse_spec(text, str(path))


def check_vocabulary(spec: StudySpec, tokenizer: Any) -> None:
    """For word-level tokenizers: every word of every prompt must be known (error names the line)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "WordLevel":
        return
    vocabulary = tokenizer.get_vocab()
    for pair in spec.pairs:
        for field_name, text in (("prompt", pair.prompt), ("negative", pair.negative)):
            unknown = [w for w in text.lower().split() if w not in vocabulary]
            if unknown:
                known = " ".join(w for w in sorted(vocabulary, key=vocabulary.get) if not w.startswith("<"))
                raise SpecError(
                    f"{spec.source}:{pair.line}: {field_name} {text!r} has word(s) {', '.join(map(repr, unknown))} "
                    f"unknown to the model's tokenizer; known words: {known}"
                )
