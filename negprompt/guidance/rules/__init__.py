"""Guidance rules, one module each, behind the :class:`~negprompt.guidance.rules.base.Rule` protocol.

Adding a rule: write its module here (a ``Rule`` subclass and ``RULE = ...``) and its test; every
module of this package but ``base`` is a rule, listed in the order of the rules' ``listing_order``.
Packages outside negprompt add rules through the entry-point group ``negprompt.rules`` (each entry
point names a ``Rule`` object).
"""

from __future__ import annotations

import pkgutil
from importlib import import_module, metadata

from negprompt.guidance.rules.base import GuidanceError, Rule


def built_in_rules() -> dict[str, Rule]:
    """Every rule module of this package (all but ``base``), by rule name, in ``listing_order``."""
    modules = [info.name for info in pkgutil.iter_modules(__path__) if info.name != "base"]
    rules = [import_module(f"{__name__}.{module}").RULE for module in modules]
    return {rule.name: rule for rule in sorted(rules, key=lambda rule: (rule.listing_order, rule.name))}


RULES: dict[str, Rule] = built_in_rules()
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
