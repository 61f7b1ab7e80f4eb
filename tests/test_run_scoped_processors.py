"""NAG's and VSF's processors installed once per run (issue 32, docs/gpu-cost.md), and Wan 2.2's expert picked before
the loop: installs not proportional to the steps, processors restored after the run and after an error, calls
outside the negative's window passed through, groups of one run (``run_together``) each given their own rule's
combination and bit-identical to running alone, the negative's keys and stream start computed once per run; the
same for the readers of FLUX.2 [klein], Qwen-Image and Z-Image (their forward pre-hooks too)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention

from negprompt.guidance.attention_processors import NegativeAttentionProcessor
from negprompt.layers.attention import attention_paths
from negprompt.session import Session

PROMPT, NEGATIVE = "a photo of a cat", "glasses"
OPTIONS = dict(seeds=[1, 2], size=32)
SD_OPTIONS = dict(scheduler="ddim", **OPTIONS)  # one denoiser call per step
READER_FAMILIES = {  # family: (builder module, builder, its NAG processor, the stream start run once per negative)
    "flux2_klein": ("tiny_flux2_klein", "build_tiny_flux2_klein", "Flux2NegativeProcessor", "context_embedder"),
    "qwen_image": ("tiny_qwen_image", "build_tiny_qwen_image", "QwenNegativeProcessor", "txt_in"),
    "z_image": ("tiny_z_image", "build_tiny_z_image", "ZImageNegativeProcessor", "context_refiner.0"),
}


@pytest.fixture()
def set_processor_calls(monkeypatch) -> Counter:
    """Counts ``Attention.set_processor`` calls by the processor's class name."""
    calls: Counter = Counter()
    original = Attention.set_processor

    def counting(self, processor):
        calls[type(processor).__name__] += 1
        return original(self, processor)

    monkeypatch.setattr(Attention, "set_processor", counting)
    return calls


@pytest.mark.parametrize("rule", ["nag", "vsf"])
def test_processors_are_installed_once_per_run_whatever_the_steps(tiny_sd, set_processor_calls, rule):
    session = Session(tiny_sd)
    cross = len(attention_paths(tiny_sd.unet, "cross"))
    counts = {}
    for steps in (2, 4):
        set_processor_calls.clear()
        session.run(session.spec(PROMPT, NEGATIVE, rule=rule, scale=1, steps=steps, **SD_OPTIONS))
        counts[steps] = dict(set_processor_calls)
    assert counts[2] == counts[4]  # not proportional to the steps
    assert counts[4]["NegativeAttentionProcessor"] == cross  # one install per cross-attention layer
    assert sum(counts[4].values()) == 2 * cross  # and one restore


def test_calls_outside_the_window_pass_through_and_processors_are_restored(tiny_sd):
    unet = tiny_sd.unet
    session = Session(tiny_sd)
    before = dict(unet.attn_processors)
    path = attention_paths(unet, "cross")[0]
    handed = []  # per denoiser call: whether the run's processors were handed a negative

    def look(module, args):
        processor = module.get_submodule(path).processor
        handed.append(isinstance(processor, NegativeAttentionProcessor) and processor.slot.current is not None)

    handle = unet.register_forward_pre_hook(look)
    try:
        spec = session.spec(PROMPT, NEGATIVE, rule="nag", scale=1, steps=4, negative_windows=["2:"], **SD_OPTIONS)
        session.run(spec)
    finally:
        handle.remove()
    assert handed == [False, False, True, True]
    assert all(processor is before[key] for key, processor in unet.attn_processors.items())

    def fail(info):
        if info.step == 1:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        session.run(session.spec(PROMPT, NEGATIVE, rule="vsf", scale=1, steps=4, **SD_OPTIONS), callback=fail)
    assert all(processor is before[key] for key, processor in unet.attn_processors.items())


def _specs(session: Session, steps: int) -> list:
    options = dict(steps=steps, **OPTIONS)
    return [
        session.spec(PROMPT, NEGATIVE, rule="nag", scale=1, **options),
        session.spec(PROMPT, rule="cfg", scale=4, **options),
        session.spec(PROMPT, NEGATIVE, rule="vsf", scale=3, **options),
        session.spec(PROMPT, "red " + NEGATIVE, rule="nag", scale=1, rule_settings={"phi": 3.0}, **options),
        session.spec(PROMPT, NEGATIVE, rule="sd", scale=4, **options),
    ]


@pytest.mark.parametrize("model", ["tiny_sd", "tiny_flux"])
def test_run_together_gives_each_group_its_own_rule_bit_identical_to_running_alone(model, request):
    session = Session(request.getfixturevalue(model))
    specs = _specs(session, steps=3)
    together = session.run_together(specs)
    for spec, generation in zip(specs, together):
        assert np.array_equal(generation.pixels, session.run(spec).pixels), spec.guidance.rule
    assert not np.array_equal(together[0].pixels, together[3].pixels)  # the two NAG groups differ


def test_the_negative_keys_are_computed_once_per_run(tiny_sd):
    """In a cross-attention layer: the positive's keys at every call, the negative's once per run."""
    session = Session(tiny_sd)
    layer = tiny_sd.unet.get_submodule(attention_paths(tiny_sd.unet, "cross")[0])
    calls = []
    handle = layer.to_k.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    try:
        counted = {}
        for steps in (2, 4):
            calls.clear()
            session.run(session.spec(PROMPT, NEGATIVE, rule="nag", scale=1, steps=steps, **SD_OPTIONS))
            counted[steps] = len(calls)
    finally:
        handle.remove()
    assert (counted[4] - counted[2]) / 2 == 1  # per step: the positive's keys only
    assert counted[2] == 2 + 1  # two steps' positive keys, the negative's once


def test_the_negative_stream_starts_once_per_run(tiny_flux):
    """FLUX: ``context_embedder`` of the positive's states at every call, of the negative's once per run."""
    session = Session(tiny_flux)
    calls = []
    embedder = tiny_flux.transformer.context_embedder
    handle = embedder.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        counted = {}
        for steps in (2, 4):
            calls.clear()
            session.run(session.spec(PROMPT, NEGATIVE, rule="nag", scale=1, steps=steps, **OPTIONS))
            counted[steps] = len(calls)
    finally:
        handle.remove()
    assert (counted[4] - counted[2]) / 2 == 1 and counted[2] == 2 + 1


def test_a_run_with_capture_and_nag_keeps_its_observers_inside(tiny_sd):
    """Capture's observers are installed before the loop, NAG's processors wrap them for the run; both restored."""
    from negprompt.analysis.attention_stats import reduce_layer
    from negprompt.attention.capture import CaptureRequest
    from negprompt.attention.result import capture

    session = Session(tiny_sd)
    before = dict(tiny_sd.unet.attn_processors)
    spec = session.spec(PROMPT, NEGATIVE, rule="nag", scale=1, steps=3, **SD_OPTIONS)
    result = capture(
        spec, CaptureRequest({"positive": ["cat"], "negative": ["glasses"]}), session, reducer=reduce_layer
    )
    assert result.present("negative").all()  # the negative's attention reached the observers at every step
    assert np.array_equal(result.generation.pixels, session.run(spec).pixels)
    assert all(processor is before[key] for key, processor in tiny_sd.unet.attn_processors.items())


def test_wan_two_experts_pick_the_expert_before_the_loop_and_nag_runs_on_both(monkeypatch):
    from negprompt.testing.tiny_wan import build_tiny_wan

    two = build_tiny_wan(two_experts=True, boundary_ratio=0.7)
    session = Session(two)
    spec = session.spec(PROMPT, NEGATIVE, steps=4, size=32, frames=5, seeds=[1], scale=1.0, rule="nag")
    reference = session.run(spec).pixels
    events = []
    family = type(two.family)
    expert_at = family.expert_at
    monkeypatch.setattr(family, "expert_at", lambda self, c, t: events.append("expert_at") or expert_at(self, c, t))
    hooks = [
        module.register_forward_pre_hook(lambda m, a, name=name: events.append(name))
        for name, module in (("transformer", two.transformer), ("transformer_2", two.transformer_2))
    ]
    try:
        pixels = session.run(spec).pixels
    finally:
        for hook in hooks:
            hook.remove()
    calls = [event for event in events if event != "expert_at"]
    assert calls[0] == "transformer" and calls[-1] == "transformer_2"  # both experts predict
    first_call = events.index("transformer")
    assert "expert_at" not in events[first_call:]  # no expert picked (a host sync on a device) inside the loop
    assert np.array_equal(pixels, reference)
    assert torch.isfinite(torch.from_numpy(pixels)).all()


@pytest.mark.parametrize("model", ["tiny_sd", "tiny_flux", *READER_FAMILIES])
def test_a_capture_of_the_second_nag_group_sees_through_the_first_groups_processors(model, request):
    """Two NAG groups in one run: the second's processors wrap the first's (installed for the run, passing its calls
    through), which wrap capture's observers; the capture of the second group still gets its negative's maps."""
    from negprompt.analysis.attention_stats import reduce_layer
    from negprompt.attention.capture import CaptureRequest, capture_attention
    from negprompt.attention.result import capture, plan_for

    session = Session(_reader_family(model)[0] if model in READER_FAMILIES else request.getfixturevalue(model))
    first = session.spec(PROMPT, "red glasses", rule="nag", steps=3, **OPTIONS)
    second = session.spec("a dog on a beach", "blue glasses", rule="nag", steps=3, **OPTIONS)
    request = CaptureRequest(words={"negative": ["glasses"]})
    alone = capture(second, request, session, reducer=reduce_layer).tensors["maps.negative"]
    assert alone.abs().sum() > 0
    with session.exclusive() as components:
        with capture_attention(components.denoiser, plan_for(second, request, session), reduce_layer, 1) as recorder:
            session.run_together([first, second], unet_hooks=[recorder])
    assert torch.equal(recorder.tensors["maps.negative"], alone)


# ---------------------------------------------------------------- the readers of FLUX.2 [klein], Qwen-Image, Z-Image


def _reader_family(name: str) -> tuple:
    """(components, the family's NAG processor class name, the module its negative's stream start runs through)."""
    import importlib

    module, builder, processor, start = READER_FAMILIES[name]
    components = getattr(importlib.import_module(f"negprompt.testing.{module}"), builder)(seed=0)
    return components, processor, components.transformer.get_submodule(start)


@pytest.fixture()
def set_processor_calls_any_layer(monkeypatch) -> Counter:
    """Counts ``set_processor`` calls by the processor's class name, on diffusers' ``Attention`` (Qwen-Image,
    Z-Image) and its ``AttentionModuleMixin`` layers (FLUX.2's)."""
    from diffusers.models.attention import AttentionModuleMixin

    calls: Counter = Counter()
    for cls in (Attention, AttentionModuleMixin):
        original = cls.set_processor

        def counting(self, processor, original=original):
            calls[type(processor).__name__] += 1
            return original(self, processor)

        monkeypatch.setattr(cls, "set_processor", counting)
    return calls


def _pre_hooks(transformer: torch.nn.Module) -> int:
    """Forward pre-hooks on the transformer and every module under it (its blocks)."""
    return sum(len(module._forward_pre_hooks) for module in transformer.modules())


@pytest.mark.parametrize("family", list(READER_FAMILIES))
def test_reader_families_install_nag_once_per_run_and_restore_processors_and_hooks(
    family, set_processor_calls_any_layer
):
    from negprompt.layers.processors import processors_of

    components, processor_name, _ = _reader_family(family)
    transformer = components.transformer
    session = Session(components)
    layers = len(components.family.attention_layout(components).reader.paths(transformer))
    before, hooks_before = processors_of(transformer), _pre_hooks(transformer)
    hooks_during = []
    counts = {}
    for steps in (2, 4):
        set_processor_calls_any_layer.clear()
        spec = session.spec(PROMPT, NEGATIVE, rule="nag", scale=1, steps=steps, seeds=[1], size=32)
        session.run(spec, callback=lambda info: hooks_during.append(_pre_hooks(transformer)))
        counts[steps] = dict(set_processor_calls_any_layer)
        assert all(processor is before[key] for key, processor in processors_of(transformer).items())
        assert _pre_hooks(transformer) == hooks_before == 0  # no hook left on the transformer or its blocks
    assert counts[2] == counts[4]  # not proportional to the steps
    assert counts[4][processor_name] == layers  # one install per layer with text keys
    assert sum(counts[4].values()) == 2 * layers  # and one restore
    assert min(hooks_during) > hooks_before  # the run's hooks were there during its steps

    def fail(info):
        if info.step == 1:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        session.run(session.spec(PROMPT, NEGATIVE, rule="vsf", scale=1, steps=3, seeds=[1], size=32), callback=fail)
    assert all(processor is before[key] for key, processor in processors_of(transformer).items())
    assert _pre_hooks(transformer) == hooks_before


@pytest.mark.parametrize("family", list(READER_FAMILIES))
def test_reader_families_start_the_negative_stream_once_per_run(family):
    """The module that starts a text stream runs on the positive at every call, on the negative once per run."""
    components, _, start = _reader_family(family)
    session = Session(components)
    calls = []
    handle = start.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        counted = {}
        for steps in (2, 4):
            calls.clear()
            session.run(session.spec(PROMPT, NEGATIVE, rule="nag", scale=1, steps=steps, seeds=[1], size=32))
            counted[steps] = len(calls)
    finally:
        handle.remove()
    per_step = (counted[4] - counted[2]) / 2
    assert per_step >= 1 and counted[2] == 2 * per_step + 1
