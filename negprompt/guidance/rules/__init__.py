"""Guidance rules, one module each, behind the :class:`~negprompt.guidance.rules.base.Rule` protocol.

Adding a rule: write its module (a ``Rule`` subclass and ``RULE = ...``), its test, and add the
module's name to ``RULE_MODULES``. Packages outside negprompt add rules through the entry-point group
``negprompt.rules`` (each entry point names a ``Rule`` object).
"""

from __future__ import annotations

from importlib import import_module, metadata

from negprompt.guidance.rules.base import GuidanceError, Rule

RULE_MODULES = ("cfg", "sd", "dual", "weighted", "perp_neg", "dng", "apg", "cfg_zero_star", "nag", "vsf")
RULES: dict[str, Rule] = {
    rule.name: rule for rule in (import_module(f"{__name__}.{module}").RULE for module in RULE_MODULES)
}
ENTRY_POINT_GROUP = "negprompt.rules"


def all_rules() -> dict[str, Rule]:
    """The built-in rules and those installed packages register, by name."""
    found = dict(RULES)
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        rule = entry.load()
        if isinstance(rule, Rule) and rule.name not in found:
            found[rule.name] = rule
    return found


def rule_named(name: str) -> Rule:
    """The rule called ``name``, or a :class:`GuidanceError` listing the rules there are."""
    if name in RULES:
        return RULES[name]
    available = all_rules()
    if name not in available:
        raise GuidanceError(f"unknown rule {name!r}; choose one of: {', '.join(available)}")
    return available[name]
