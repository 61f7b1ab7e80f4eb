"""The sampling loop on a tiny Stable Diffusion: agreement with diffusers, batching, windows, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from negprompt.errors import NegpromptError
from negprompt.guidance.plan import UNCONDITIONAL, Guidance, Term
from negprompt.guidance.windows import Window
from negprompt.sampling.loop import sample
from negprompt.sampling.schedulers import SCHEDULERS, make_scheduler
from negprompt.session import Session
from negprompt.testing.peers import diffusers_pipeline

PROMPT, NEGATIVE = "a photo of a cat", "glasses"
SEEDS = [3, 11]


def ours(components, guidance, scheduler="default", steps=6, seeds=SEEDS, **kwargs):
    return sample(components, guidance, make_scheduler(scheduler, components.scheduler), seeds, steps, 32, 32, **kwargs)


def diffusers_images(components, scheduler, steps=6, seeds=SEEDS, scale=7.5):
    pipe = diffusers_pipeline(components, make_scheduler(scheduler, components.scheduler))
    return pipe(
        [PROMPT] * len(seeds),
        negative_prompt=[NEGATIVE] * len(seeds),
        num_inference_steps=steps,
        guidance_scale=scale,
        height=32,
        width=32,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="np",
    ).images


@pytest.mark.parametrize("scheduler", ["default", "euler-a", "dpm++2m", "ddim", "unipc"])
def test_equals_diffusers_pipeline_with_one_negative(tiny_sd, scheduler):
    guidance = Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE),), scale=7.5)
    mine = ours(tiny_sd, guidance, scheduler).images
    theirs = diffusers_images(tiny_sd, scheduler)
    assert mine.shape == theirs.shape == (2, 32, 32, 3)
    assert np.abs(mine - theirs).max() <= 1e-4


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_every_scheduler_runs(tiny_sd, scheduler):
    guidance = Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE, window=Window(0.3)),))
    out = ours(tiny_sd, guidance, scheduler, steps=4, seeds=[0])
    assert np.isfinite(out.images).all() and out.images.shape == (1, 32, 32, 3)


class CountingHook:
    def __init__(self):
        self.calls = []

    def before_unet_call(self, step, timestep, blocks):
        self.calls.append((step, tuple(b.branch for b in blocks), blocks[0].stop - blocks[0].start))


def unet_forward_counter(unet):
    counts = []
    handle = unet.register_forward_hook(lambda module, args, output: counts.append(args[0].shape[0]))
    return counts, handle


def test_one_batched_unet_call_per_step(tiny_sd):
    guidance = Guidance(rule="dual", positive=Term(PROMPT), negatives=(Term(NEGATIVE, 3.0),))
    counts, handle = unet_forward_counter(tiny_sd.unet)
    try:
        out = ours(tiny_sd, guidance, "ddim", steps=5)
    finally:
        handle.remove()
    assert counts == [3 * len(SEEDS)] * 5
    assert out.unet_batch_rows == 15 * len(SEEDS)


def test_inactive_and_unused_branches_are_not_computed(tiny_sd):
    hook = CountingHook()
    guidance = Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE, window=Window(2)),))
    ours(tiny_sd, guidance, "ddim", steps=5, unet_hooks=[hook])
    assert [c[1] for c in hook.calls] == [(UNCONDITIONAL, "positive")] * 2 + [("negative", "positive")] * 3
    # Rule (8) with the negative for the second half only: fewer rows than over all steps.
    half = Guidance(rule="dual", positive=Term(PROMPT), negatives=(Term(NEGATIVE, 3.0, Window(0.5)),))
    full = Guidance(rule="dual", positive=Term(PROMPT), negatives=(Term(NEGATIVE, 3.0),))
    assert ours(tiny_sd, half, "ddim", steps=6).unet_batch_rows < ours(tiny_sd, full, "ddim", steps=6).unet_batch_rows


def test_delayed_negative_starts_like_cfg_and_ends_different(tiny_sd):
    cfg = Guidance(rule="cfg", positive=Term(PROMPT))
    delayed = Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE, window=Window(3)),))
    a, b = [], []
    ours(tiny_sd, cfg, "ddim", steps=6, callback=lambda info: a.append(info.guided))
    ours(tiny_sd, delayed, "ddim", steps=6, callback=lambda info: b.append(info.guided))
    for step in range(3):
        assert torch.equal(a[step], b[step])
    assert not torch.allclose(a[5], b[5])


def test_callback_sees_named_branches_and_cannot_change_the_result(tiny_sd):
    guidance = Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE),))
    seen = []

    def vandal(info):
        seen.append((info.step, sorted(info.predictions), info.timestep, info.latents.shape, info.denoised.shape))
        info.latents.mul_(0)
        info.guided.add_(100)
        for value in info.predictions.values():
            value.zero_()

    clean = ours(tiny_sd, guidance, "euler", steps=4).images
    touched = ours(tiny_sd, guidance, "euler", steps=4, callback=vandal).images
    assert np.array_equal(clean, touched)
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert all(s[1] == ["negative", "positive"] for s in seen)
    assert seen[0][3] == (2, 4, 16, 16)  # VAE factor 2 on 32 px


def test_trace_is_kept_on_request(tiny_sd):
    guidance = Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE),))
    out = ours(tiny_sd, guidance, "pndm", steps=4, keep_trace=True)
    assert out.trace is not None and len(out.trace) == out.num_steps == 5  # PNDM: N + 1 UNet calls
    assert ours(tiny_sd, guidance, "pndm", steps=4).trace is None


def test_same_seed_same_settings_is_bit_identical(tiny_sd):
    guidance = Guidance(rule="dual", positive=Term(PROMPT), negatives=(Term(NEGATIVE, 2.0, Window(1, 4)),))
    first = ours(tiny_sd, guidance, "euler-a").images
    second = ours(tiny_sd, guidance, "euler-a").images
    assert np.array_equal(first, second)


def test_each_image_depends_on_its_own_seed_only(tiny_sd):
    guidance = Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE),))
    batch = ours(tiny_sd, guidance, "euler-a", seeds=[3, 11]).images
    alone = ours(tiny_sd, guidance, "euler-a", seeds=[11]).images
    assert np.abs(batch[1] - alone[0]).max() < 1e-5
    assert np.abs(batch[0] - batch[1]).max() > 1e-3


def test_per_image_prompts(tiny_sd):
    guidance = Guidance(positive=Term(("a cat", "a dog")), negatives=(Term(NEGATIVE),))
    both = ours(tiny_sd, guidance, "ddim", seeds=[5, 5]).images
    assert np.abs(both[0] - both[1]).max() > 1e-4


def test_empty_positive_prompt_is_unconditional_generation(tiny_sd):
    out = ours(tiny_sd, Guidance(rule="cfg", positive=Term("")), "ddim", steps=3)
    assert np.isfinite(out.images).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "1–1000"),
        (dict(steps=1001), "1–1000"),
        (dict(seeds=[]), "seed"),
    ],
)
def test_bad_sampler_settings(tiny_sd, kwargs, message):
    """Refused where the run is specified (RunSpec, Session.check): the loop asserts them."""
    with pytest.raises(NegpromptError, match=message):
        Session(tiny_sd).spec(PROMPT, scheduler="ddim", **kwargs)


def test_size_must_be_a_multiple_of_the_model_factor(tiny_sd):
    with pytest.raises(NegpromptError, match="multiple of 4"):
        Session(tiny_sd).spec(PROMPT, scheduler="ddim", steps=3, height=30, width=32)


def test_window_outside_the_schedule(tiny_sd):
    guidance = Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE, window=Window(2, 9)),))
    with pytest.raises(NegpromptError, match="outside the schedule"):
        ours(tiny_sd, guidance, "ddim", steps=5)


def test_too_long_prompt_names_the_cut_words(tiny_sd):
    long_prompt = " ".join(["cat"] * 75 + ["with", "red", "hat"])
    guidance = Guidance(positive=Term(long_prompt))
    with pytest.raises(NegpromptError, match="would be cut: 'with red hat'"):
        ours(tiny_sd, guidance, "ddim", steps=2)


def test_unknown_scheduler(tiny_sd):
    with pytest.raises(NegpromptError, match="unknown scheduler 'karras'.*ddim"):
        make_scheduler("karras", tiny_sd.scheduler)


def test_groups_share_the_steps_they_have_in_common(tiny_sd):
    """No negative, negative at all steps, negative from step 3: the delayed group reuses the plain
    group's UNet rows before step 3, and a group identical to another costs nothing."""
    from negprompt.sampling.loop import Group, encode_groups, sample_groups

    plain = Group(Guidance(rule="cfg", positive=Term(PROMPT)), (3, 11))
    full = Group(Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE),)), (3, 11))
    delayed = Group(Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE, window=Window(3)),)), (3, 11))
    steps, batch = 6, 2
    groups, scheduler = [plain, full, delayed, full], make_scheduler("ddim", tiny_sd.scheduler)
    out = sample_groups(
        tiny_sd, groups, scheduler, steps, 32, 32, conditioning=encode_groups(tiny_sd, groups, scheduler, steps)
    )
    # Each group has its own call (so its images equal a run alone); groups in the same state share it.
    # Steps 0–2: the delayed group is in the plain group's state: plain 2 + full 2 blocks.
    # Steps 3–5: the delayed negative is on: plain 2 + full 2 + delayed 2. The fourth group repeats
    # the second: nothing extra.
    assert out.unet_batch_rows == batch * (4 + 4 + 4 + 6 + 6 + 6)
    images = out.images.reshape(4, batch, 32, 32, 3)
    assert np.array_equal(images[1], images[3])
    assert not np.array_equal(images[0], images[2]) and not np.array_equal(images[1], images[2])
    alone = ours(tiny_sd, delayed.guidance, "ddim", steps=steps, seeds=(3, 11)).images
    assert np.array_equal(alone, images[2])  # bit-identical to the group run alone


def test_groups_with_a_window_covering_all_steps_equal_the_full_negative_bit_exactly(tiny_sd):
    from negprompt.sampling.loop import Group, encode_groups, sample_groups

    full = Group(Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE),)), (5,))
    covering = Group(Guidance(positive=Term(PROMPT), negatives=(Term(NEGATIVE, window=Window(0, 1.0)),)), (5,))
    groups, scheduler = [full, covering], make_scheduler("euler-a", tiny_sd.scheduler)
    out = sample_groups(
        tiny_sd, groups, scheduler, 5, 32, 32, conditioning=encode_groups(tiny_sd, groups, scheduler, 5)
    )
    assert np.array_equal(out.images[0], out.images[1])
