"""Rules as plugins: one protocol, settings that generate flags, infotext and JSON; a rule's prepare hook."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from PIL import Image

from negprompt.errors import NegpromptError
from negprompt.guidance.plan import Guidance, Term
from negprompt.guidance.rules import RULES, rule_named
from negprompt.guidance.rules.base import GuidanceError, NoSettings, Rule, RuleSettings, option
from negprompt.guidance.rules.dng import DNGSettings
from negprompt.interfaces.cli import build_parser, main
from negprompt.session import Session


def test_every_rule_follows_the_protocol():
    for name, rule in RULES.items():
        assert isinstance(rule, Rule) and rule.name == name and rule.summary
        assert issubclass(rule.Settings, RuleSettings)
        rule.Settings().validate()  # defaults are valid
        assert rule_named(name) is rule


def test_unknown_rule_lists_every_rule():
    with pytest.raises(GuidanceError, match="choose one of: cfg, sd, dual"):
        rule_named("nope")


def test_flags_and_help_come_from_the_settings():
    parser = build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    flags = {flag: action for action in generate._actions for flag in action.option_strings}
    for rule in RULES.values():
        for field in rule.Settings.options():
            action = flags[rule.Settings.flag(field)]
            assert field.metadata["help"] in action.help and f"default {field.default}" in action.help
            assert action.default is None  # so that a flag of another rule can be told apart
    assert "--dng-lambda" in flags and "--apg-threshold" in flags  # the flag names users know
    assert "dng: Dynamic Negative Guidance" in flags["--rule"].help


def test_settings_of_another_rule_are_refused():
    with pytest.raises(GuidanceError, match="do not belong to rule 'sd'"):
        Guidance(rule="sd", settings=DNGSettings())
    with pytest.raises(GuidanceError, match="has no option 'eta'"):
        Guidance(rule="dng", negatives=(Term("b"),), settings={"eta": 1.0})


def test_settings_from_mapping_with_plain_or_qualified_names():
    a = Guidance(rule="dng", negatives=(Term("b"),), settings={"strength": 3.0})
    b = Guidance(rule="dng", negatives=(Term("b"),), settings={"dng_strength": 3.0})
    assert a == b and a.settings == DNGSettings(strength=3.0)


def test_json_of_the_first_format_still_loads():
    """PNGs written before rules were plugins stored every rule's options in one object."""
    old = {
        "rule": "dng",
        "scale": 7.5,
        "positive": {"prompt": "a", "scale": None, "window": [0, None]},
        "negatives": [{"prompt": "b", "scale": None, "window": [0, None]}],
        "extra_positives": [],
        "settings": {
            "dng_strength": 3.0,
            "dng_prior": 0.01,
            "dng_p_min": 0.0001,
            "dng_p_max": 0.5,
            "apg_eta": 0.0,
            "apg_norm_threshold": 0.0,
            "apg_momentum": 0.0,
        },
    }
    guidance = Guidance.from_json(old)
    assert guidance.settings == DNGSettings(strength=3.0, p_max=0.5)
    assert Guidance.from_json(guidance.to_json()) == guidance
    assert guidance.to_json()["settings"] == {"strength": 3.0, "prior": 0.01, "p_min": 0.0001, "p_max": 0.5}


def test_default_settings_are_not_written_and_infotext_lists_the_rules_options():
    guidance = Guidance(rule="dng", negatives=(Term("b"),))
    assert "settings" not in guidance.to_json()
    assert "dng_strength: 5.0" in guidance.infotext_fields() and "Rule: dng" in guidance.infotext_fields()
    assert not any("dng_" in f for f in Guidance(rule="sd", negatives=(Term("b"),)).infotext_fields())


def test_cli_rule_option_reaches_the_png(tiny_sd_dir, tmp_path):
    out = tmp_path / "dng.png"
    args = ["generate", "a photo of a cat", "-n", "glasses", "--rule", "dng", "--dng-lambda", "2.5"]
    args += ["--model", str(tiny_sd_dir), "--steps", "3", "--size", "32", "-q", "--out", str(out)]
    assert main(args) == 0
    with Image.open(out) as image:
        assert "dng_strength: 2.5" in image.text["parameters"]
        assert json.loads(image.text["negprompt"])["settings"]["guidance"]["settings"]["strength"] == 2.5


# ---------------------------------------------------------------- the prepare hook


@dataclass(frozen=True)
class CountingSettings(RuleSettings):
    rule = "counting"
    factor: float = option(1.0, "a test option")


class CountingRule(Rule):
    """SD's rule, plus a prepare hook that records the steps it was entered and left around the denoiser."""

    name = "counting"
    summary = "test rule"
    Settings = CountingSettings

    def __init__(self) -> None:
        self.events: list[tuple[str, int, tuple[str, ...]]] = []

    def combine(self, guidance, branches, state):
        eps_neg = branches.eps("negative") if "negative" in guidance.terms else branches.unconditional
        return eps_neg + guidance.scale * (branches.eps("positive") - eps_neg)

    def prepare(self, guidance, denoiser, context, conditioning):
        rule = self

        class Hook:
            def __enter__(self):
                rule.events.append(("enter", context.step, tuple(sorted(conditioning))))

            def __exit__(self, *exc):
                rule.events.append(("exit", context.step, ()))

        return Hook()


def test_a_rule_outside_the_registry_runs_through_the_loop_with_its_prepare_hook(tiny_sd, monkeypatch):
    rule = CountingRule()
    monkeypatch.setitem(RULES, "counting", rule)
    session = Session(tiny_sd)
    options = dict(steps=3, scheduler="ddim", size=32)
    counting = session.spec("a photo of a cat", "glasses", rule="counting", **options)
    reference = session.spec("a photo of a cat", "glasses", rule="sd", **options)
    assert (session.run(counting).pixels == session.run(reference).pixels).all()
    steps = [(kind, step) for kind, step, _ in rule.events]
    assert steps == [("enter", 0), ("exit", 0), ("enter", 1), ("exit", 1), ("enter", 2), ("exit", 2)]
    assert rule.events[0][2] == ("negative", "positive", "unconditional")  # each evaluated branch's conditioning


def test_no_settings_rule_has_no_options():
    assert NoSettings.options() == () and NoSettings().infotext_fields() == []
    with pytest.raises(NegpromptError):
        NoSettings.from_json({"x": 1})
