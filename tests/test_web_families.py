"""The page's handlers on the newer families (Chroma, FLUX.2 [klein], Qwen-Image, Z-Image), each a tiny random
model built from configs: the page builds with the family's own fields (and without the ones it does not
read), a generate job and an attention job come back with their images and maps, and the options a family
does not read are refused in one line before anything runs.

What could break: a family whose page fails to build or whose tabs only work on UNet models, a second prompt
or an embedded guidance scale silently ignored where the family reads none, maps missing on joint attention.
"""

from __future__ import annotations

import numpy as np
import pytest

from negprompt.interfaces.png import read_pixels
from negprompt.interfaces.web import handlers
from negprompt.interfaces.web.handlers import AttentionRequest, GenerateRequest, NegativeInput, PageJob, error_message
from negprompt.interfaces.web.settings import ServerLimits
from negprompt.runspec import to_uint8
from negprompt.session import Session

LIMITS = ServerLimits()
PROMPT, NEGATIVE = "a photo of a cat with glasses", "a red hat"
SMALL = {"steps": 2, "width": 32, "height": 32}
FAMILIES = ("chroma", "flux2-klein", "qwen-image", "z-image")


def build(name: str):
    if name == "chroma":
        from negprompt.testing.tiny_chroma import build_tiny_chroma

        return build_tiny_chroma(seed=0)
    if name == "flux2-klein":
        from negprompt.testing.tiny_flux2_klein import build_tiny_flux2_klein

        return build_tiny_flux2_klein(seed=0)
    if name == "qwen-image":
        from negprompt.testing.tiny_qwen_image import build_tiny_qwen_image

        return build_tiny_qwen_image(seed=0)
    from negprompt.testing.tiny_z_image import build_tiny_z_image

    return build_tiny_z_image(seed=0)


@pytest.fixture(scope="module", params=FAMILIES)
def session(request) -> Session:
    made = Session(build(request.param))
    assert made.components.family.name == request.param
    return made


def page_ids(session: Session) -> set[str]:
    from negprompt.interfaces.web.app import JobFolders, build_app

    folders = JobFolders()
    try:
        page = build_app(session, LIMITS, folders)
    finally:
        folders.remove()
    return {block.elem_id for block in page.blocks.values() if getattr(block, "elem_id", None)}


def test_the_page_builds_without_the_fields_the_family_does_not_read(session):
    ids = page_ids(session)
    assert {"generate-run", "generate-negative-every", "generate-window-auto-0", "attention-timeline"} <= ids
    assert not {"generate-prompt-2", "generate-embedded-guidance"} & ids


def test_a_generate_job_and_an_attention_job_come_back_with_images_and_maps(session, tmp_path):
    reports = []
    job = PageJob(on_progress=lambda done, total, preview: reports.append((done, total, preview)))
    request = GenerateRequest(PROMPT, (NegativeInput(NEGATIVE),), seed=3, compare=True, compare_start=1, **SMALL)
    result = handlers.generate(session, request, LIMITS, tmp_path / "generate", job)
    assert [(done, total) for done, total, _ in reports] == [(1, 2), (2, 2)] and reports[-1][2].size == (32, 32)
    [png] = result.pngs
    assert png.exists() and result.generation.pixels.shape == (1, 32, 32, 3)
    assert result.infotext.splitlines()[:2] == [PROMPT, f"Negative prompt: {NEGATIVE}"]
    plain, negative, _ = (read_pixels(path) for path, _ in result.comparison)
    assert not np.array_equal(plain, negative)  # the negative changed the image

    asked = AttentionRequest(PROMPT, NEGATIVE, words="cat, glasses", negative_words="hat", seed=3, **SMALL)
    maps = handlers.attend(session, asked, LIMITS, tmp_path / "attention", PageJob())
    assert maps.steps == [0, 1] and maps.negative_words == ["hat"] and maps.png.exists()
    for branch, word in (("positive", "cat"), ("positive", "glasses"), ("negative", "hat")):
        stored = maps.capture.maps(branch, word)
        assert stored.shape[:2] == (2, 1) and stored.shape[-1] == stored.shape[-2] > 1
        assert bool(stored.isfinite().all()) and float(stored.sum()) > 0
    assert maps.timeline.size[0] > 200 and handlers.step_view(session, maps.capture, 1).size[1] == maps.timeline.size[1]
    figure, note = handlers.strength_view(maps.capture, "hat")
    assert figure.size == (600, 340) and note.split("**")[1] in {"cat", "glasses"}


@pytest.mark.parametrize(
    "asked, message",
    [
        ({"prompt_2": "a dog"}, "prompt_2: option(s) of SDXL, SD3 and FLUX models, but tiny-"),
        ({"embedded_guidance": 3.5}, "embedded guidance 3.5 given, but tiny-"),
    ],
)
def test_options_the_family_does_not_read_are_refused_in_one_line(session, tmp_path, asked, message):
    job = PageJob()
    with pytest.raises(handlers.NegpromptError) as caught:
        handlers.generate(
            session, GenerateRequest(PROMPT, (NegativeInput(NEGATIVE),), **SMALL, **asked), LIMITS, tmp_path, job
        )
    line = error_message(caught.value)
    assert line.startswith("negprompt: error: ") and message in line and "\n" not in line, line
    assert session.model in line
    assert job.unet_calls == 0 and not list(tmp_path.iterdir())


def test_each_familys_own_refusals_reach_the_page_as_one_line(session, tmp_path):
    """Qwen-Image and Z-Image refuse A1111 weights (their encoders read the template's tokens); a step-distilled
    Klein takes no negative branch; Chroma takes both (the weights scale its T5 tokens)."""
    name = session.components.family.name
    weighted = GenerateRequest("a photo of a (cat:1.5)", (NegativeInput(NEGATIVE),), **SMALL)
    if name in ("qwen-image", "z-image"):
        with pytest.raises(handlers.NegpromptError) as caught:
            handlers.generate(session, weighted, LIMITS, tmp_path, PageJob())
        line = error_message(caught.value)
        assert line.startswith("negprompt: error: ") and "\n" not in line and "(cat:1.5)" in line, line
    else:
        assert handlers.generate(session, weighted, LIMITS, tmp_path, PageJob()).pngs[0].exists()
    if name == "flux2-klein":
        from negprompt.testing.tiny_flux2_klein import build_tiny_flux2_klein

        distilled = Session(build_tiny_flux2_klein(seed=0, distilled=True))
        with pytest.raises(handlers.NegpromptError) as caught:
            handlers.generate_specs(
                distilled, GenerateRequest(PROMPT, (NegativeInput(NEGATIVE),), rule="dual", scale=4.0, **SMALL), LIMITS
            )
        line = error_message(caught.value)
        assert line.startswith("negprompt: error: ") and "\n" not in line and "distilled" in line, line


def test_flux_shows_and_takes_its_second_prompt_and_embedded_guidance(tiny_flux, tmp_path):
    """The other side: a family that reads both gets their fields, and what is typed reaches the run."""
    flux = Session(tiny_flux)
    assert {"generate-prompt-2", "generate-embedded-guidance"} <= page_ids(flux)
    request = GenerateRequest(PROMPT, prompt_2="a dog in the rain", embedded_guidance="2.5", **SMALL)
    result = handlers.generate(flux, request, LIMITS, tmp_path, PageJob())
    spec = result.generation.spec
    assert (spec.guidance.positive.prompt_2, spec.embedded_guidance) == ("a dog in the rain", 2.5)
    assert "Embedded guidance: 2.5" in result.infotext


# ---------------------------------------------------------------- a video family (Wan)


@pytest.fixture(scope="module")
def wan() -> Session:
    from negprompt.testing.tiny_wan import build_tiny_wan

    return Session(build_tiny_wan(seed=0))


def test_a_video_comes_back_as_a_clip_beside_its_attention_maps_per_frame(wan, tmp_path):
    """Wan on the page's handlers: the Generate job writes a clip (MP4 where PyAV is installed, else an animated
    WebP) of the asked frames and the three clips side by side; the Attention job gives maps per latent frame
    F′ = (F − 1)/4 + 1, a timeline per frame, and refuses a frame that is not there in one line."""
    from negprompt.interfaces.video import container_for

    handlers.warm_up(wan, tmp_path / "warm")  # what negprompt serve runs first: a one-frame clip
    assert len(list((tmp_path / "warm").glob("negprompt_frames/clip_000/frame_*.png"))) == 1
    request = GenerateRequest(
        PROMPT, (NegativeInput(NEGATIVE),), seed=1, frames=5, compare=True, compare_start=1, **SMALL
    )
    previews = []
    job = PageJob(on_progress=lambda done, total, preview: previews.append(preview))
    result = handlers.generate(wan, request, LIMITS, tmp_path / "generate", job)
    assert previews[-1].size == (32, 32)  # x̂₀ of the clip's first frame
    [clip] = result.videos
    assert result.pngs == [] and clip.exists() and clip.suffix == "." + container_for("x.png")
    assert result.generation.pixels.shape == (1, 5, 32, 32, 3) and "Frames: 5" in result.infotext
    frames = sorted((clip.parent / f"{clip.stem}_frames" / "clip_000").glob("frame_*.png"))
    assert len(frames) == 5 and np.array_equal(read_pixels(frames[2]), to_uint8(result.generation.pixels[0, 2]))

    assert [path.suffix for path, _ in result.comparison] == [clip.suffix] * 3

    asked = AttentionRequest(PROMPT, NEGATIVE, words="cat", negative_words="hat", seed=1, frames=5, **SMALL)
    maps = handlers.attend(wan, asked, LIMITS, tmp_path / "attention", PageJob())
    assert maps.is_video and maps.latent_frames == 2 and maps.png.suffix == clip.suffix and maps.png.exists()
    stored = maps.capture.maps("negative", "hat")
    assert stored.shape[:3] == (2, 1, 2) and bool(stored.isfinite().all())  # (steps, B, F′, h′, w′)
    first, last = (np.asarray(handlers.frame_view(wan, maps.capture, f, columns=2)) for f in (0, 1))
    assert first.shape == last.shape and not np.array_equal(first, last)
    assert handlers.step_view(wan, maps.capture, 1, frame=1).size[1] == maps.timeline.size[1]
    with pytest.raises(handlers.NegpromptError) as caught:
        handlers.frame_view(wan, maps.capture, 2)
    assert error_message(caught.value) == "negprompt: error: frame 2 was not captured; latent frames: 0–1"


def test_the_page_of_a_video_model_plays_its_clips_beside_the_maps_per_frame(wan):
    from negprompt.interfaces.video import container_for

    ids = page_ids(wan)
    assert {"generate-video", "generate-frames", "attention-video", "attention-frame", "attention-frames"} <= ids
    from negprompt.interfaces.web.app import JobFolders, build_app

    folders = JobFolders()
    try:
        page = build_app(wan, LIMITS, folders)
    finally:
        folders.remove()
    [player] = [b for b in page.blocks.values() if getattr(b, "elem_id", None) == "generate-video"]
    assert type(player).__name__ == ("Video" if container_for("x.png") == "mp4" else "Image")


def test_frames_are_bounded_and_refused_on_image_families(wan, session, tmp_path):
    with pytest.raises(handlers.LimitError, match=r"frames 9 is over this server's limit of 5 .* --max-frames"):
        handlers.generate_specs(wan, GenerateRequest(PROMPT, frames=9, **SMALL), ServerLimits(frames=5))
    with pytest.raises(handlers.NegpromptError) as caught:
        handlers.generate_specs(session, GenerateRequest(PROMPT, frames=5, **SMALL), LIMITS)
    line = error_message(caught.value)
    assert line.startswith("negprompt: error: frames 5 given, but") and "makes images" in line and "\n" not in line
