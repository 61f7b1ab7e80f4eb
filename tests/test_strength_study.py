"""r_t definitions, r(i), study specs, the resumable runner and the report."""

from __future__ import annotations

import csv
import math
import textwrap

import pytest
import torch

from negprompt.analysis import study as study_module
from negprompt.analysis.report import make_report
from negprompt.analysis.spec import SpecError, check_vocabulary, parse_spec
from negprompt.analysis.strength import article_ratio, related_word, released_ratio, strength_curves
from negprompt.analysis.study import RESULTS_FILE, run_study
from negprompt.attention.result import AttentionCapture
from negprompt.interfaces.cli import main

# ---------------------------------------------------------------- r_t on hand-made maps


def hand_made_capture() -> AttentionCapture:
    """Two steps, two layers, one image; maps with known norms.

    Negative word "hat": at step 0 a 2×2 map of ones in layer 0 (‖·‖_F = 2) and of twos in layer 1
    (‖·‖_F = 4); positive "circle" maps have norm 3 and 3. Step 1 doubles the negative's maps.
    """
    size = 4
    maps_neg = torch.zeros(2, 1, 1, 1, size, size)
    maps_neg[:, 0, 0, 0, :2, :2] = 1.0  # the hat sits top-left
    maps_pos = torch.zeros(2, 1, 1, 2, size, size)
    maps_pos[:, 0, 0, 0, :2, :2] = 1.0  # "circle" overlaps the hat
    maps_pos[:, 0, 0, 1, 2:, 2:] = 1.0  # "red" elsewhere
    frob_neg = torch.tensor([[2.0, 4.0], [4.0, 8.0]]).reshape(2, 2, 1, 1)
    frob_pos = torch.tensor([[[3.0, 1.0], [3.0, 1.0]], [[3.0, 1.0], [3.0, 1.0]]]).reshape(2, 2, 1, 2)
    energy_neg = torch.tensor([[0.1, 0.3], [0.2, 0.2]]).reshape(2, 2, 1)
    energy_pos = torch.tensor([[0.2, 0.2], [0.1, 0.1]]).reshape(2, 2, 1)
    tensors = {
        "maps.negative": maps_neg.half(),
        "maps.positive": maps_pos.half(),
        "frobenius.negative": frob_neg,
        "frobenius.positive": frob_pos,
        "mass.negative": frob_neg.clone(),
        "mass.positive": frob_pos.clone(),
        "energy.negative": energy_neg,
        "energy.positive": energy_pos,
        "present.negative": torch.tensor([True, True]),
        "present.positive": torch.tensor([True, True]),
    }
    index = {
        "words": {"negative": ["hat"], "positive": ["circle", "red"]},
        "steps": [0, 1],
        "size": size,
        "average_layers": True,
        "layers": [{"path": "down_blocks.0.attentions.0.transformer_blocks.0.attn2", "side": 4}] * 2,
    }
    return AttentionCapture(tensors, index)


def test_article_ratio_on_known_norms():
    capture = hand_made_capture()
    curves = strength_curves(capture, "hat", related="circle")
    torch.testing.assert_close(curves["article"], torch.tensor([[(2 + 4) / (3 + 3)], [(4 + 8) / (3 + 3)]]))


def test_released_ratio_on_known_energies():
    capture = hand_made_capture()
    curves = strength_curves(capture, "hat", related="circle")
    torch.testing.assert_close(curves["released"], torch.tensor([[0.4 / 0.4], [0.4 / 0.2]]))
    # The two definitions are different quantities: equal at step 0 here, not at step 1.
    assert float(curves["article"][1, 0]) == pytest.approx(2.0) and float(curves["released"][1, 0]) == pytest.approx(
        2.0
    )
    assert float(curves["article"][0, 0]) == pytest.approx(1.0) and float(curves["released"][0, 0]) == pytest.approx(
        1.0
    )


def test_ratio_functions_sum_over_layers():
    neg, pos = torch.rand(3, 4, 2), torch.rand(3, 4, 2) + 0.1
    torch.testing.assert_close(article_ratio(neg, pos), neg.sum(1) / pos.sum(1))
    torch.testing.assert_close(released_ratio(neg, pos), neg.sum(1) / pos.sum(1))


def test_related_word_is_the_positive_word_whose_map_overlaps():
    assert related_word(hand_made_capture(), "hat") == ["circle"]


def ban_activation_ratio(components, settings) -> list[float]:
    """Ban et al.'s released ``compute_activation_ratio``, written again from its description and hooked
    on the UNet's attn2 modules directly (no negprompt capture code): per step, E_branch =
    Σ_{down/up-block layers} Σ_heads mean_{tokens, pixels} clamp(bicubic(A_head,token → latent side), 0)²;
    r_t = E_negative / E_positive. The mid block is not hooked."""
    import torch.nn.functional as F

    from negprompt.session import Session

    session = Session(components)
    energies: list[dict[str, float]] = []
    steps = session.denoiser_calls(settings.scheduler, settings.steps)
    layers = [
        (path, module)
        for path, module in components.unet.named_modules()
        if path.endswith("attn2") and path.startswith(("down_blocks", "up_blocks"))
    ]

    def hook(module, args, kwargs, output):
        hidden, context = args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        heads = module.heads
        q, k = module.to_q(hidden), module.to_k(context)
        batch, queries, _ = q.shape
        q = q.reshape(batch, queries, heads, -1).transpose(1, 2)
        k = k.reshape(batch, k.shape[1], heads, -1).transpose(1, 2)
        probs = (q @ k.transpose(-1, -2) * module.scale).softmax(dim=-1)  # (B, heads, Q, L)
        side = int(queries**0.5)
        latent = settings.height // components.latent_factor
        step = len(energies) - 1
        branches = settings.guidance.branches_at(step, steps)
        for row, branch in enumerate(branches):
            maps = probs[row].transpose(1, 2).reshape(-1, 1, side, side)  # (heads·L, 1, h, w)
            up = F.interpolate(maps, size=(latent, latent), mode="bicubic", align_corners=False).clamp_min(0)
            per_head = up.pow(2).reshape(heads, -1).mean(dim=1)
            energies[-1][branch] = energies[-1].get(branch, 0.0) + float(per_head.sum())

    handles = [module.register_forward_hook(hook, with_kwargs=True) for _, module in layers]
    original_forward = components.unet.forward

    def counting_forward(*args, **kwargs):
        energies.append({})
        return original_forward(*args, **kwargs)

    components.unet.forward = counting_forward
    try:
        session.run(settings)
    finally:
        del components.unet.forward
        for handle in handles:
            handle.remove()
    return [e["negative"] / e["positive"] for e in energies]


def test_released_r_t_equals_ban_et_al_compute_activation_ratio(tiny_sd):
    """The "released" r_t is exactly their code's quantity: per-head bicubic upsampling to the latent
    side, clamping before squaring, no mid block (the tiny SD has one, with cross-attention)."""
    from negprompt.attention.capture import CaptureRequest
    from negprompt.attention.result import capture
    from negprompt.session import Session

    assert any(p.startswith("mid_block") and p.endswith("attn2") for p, _ in tiny_sd.unet.named_modules())
    session = Session(tiny_sd)
    settings = session.spec("a photo of a cat", "red glasses", steps=4, scheduler="ddim", size=32, seeds=[1])
    request = CaptureRequest(words={"negative": ["glasses"], "positive": ["cat"]})
    from negprompt.analysis.attention_stats import reduce_layer

    result = capture(settings, request, session, reducer=reduce_layer)
    ours = strength_curves(result, "glasses", related="cat")["released"][:, 0]
    theirs = torch.tensor(ban_activation_ratio(tiny_sd, settings), dtype=ours.dtype)
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=0)


# ---------------------------------------------------------------- specs

GOOD = """\
name: t
model: MODEL
scheduler: ddim
steps: 3
scale: 5
size: 32
seeds: [1, 2]
pairs:
  - {group: noun, prompt: a photo of a cat, negative: red hat}
  - {group: adjective, prompt: a woman in the street, negative: glasses, related: woman}
"""


@pytest.mark.parametrize(
    "edit, message",
    [
        (("steps: 3", "steps: 3\ncolour: red"), "<spec>:5: unknown field 'colour'"),
        (("name: t\n", ""), "missing field(s) name"),
        (("seeds: [1, 2]", "seeds: []"), "<spec>:7: field 'seeds' must be a non-empty list"),
        (("seeds: [1, 2]", "seeds: [1, 1]"), "repeats a seed"),
        (("steps: 3", "steps: three"), "<spec>:4: field 'steps' must be a int"),
        (("negative: red hat}", "negative: red hat, mood: sad}"), "<spec>:9: unknown pair field 'mood'"),
        (
            ("{group: noun, prompt: a photo of a cat, negative: red hat}", "{group: noun, negative: red hat}"),
            "<spec>:9: pair lacks field(s) prompt",
        ),
        (("related: woman}", "related: dog}"), "<spec>:10: related word 'dog' is not a word of the prompt"),
        (
            ("negative: glasses,", "negative: glasses, word: hat,"),
            "<spec>:10: word 'hat' is not a word of the negative",
        ),
        (("pairs:", "pairs: [\n"), "not valid YAML"),
        (("steps: 3", "steps: 3\nrule: cfg"), "<spec>:5: field 'rule' must be one of sd, nag, vsf"),
        (("steps: 3", "steps: 3\nframes: 0"), "<spec>:5: field 'frames'"),
    ],
)
def test_spec_validation_names_the_line_and_field(edit, message):
    with pytest.raises(SpecError) as error:
        parse_spec(GOOD.replace(*edit))
    assert message in str(error.value)


def test_a_video_spec_sets_the_frames_and_an_image_spec_keeps_its_fingerprint():
    image = parse_spec(GOOD)
    assert "frames" not in image.to_json() and image.run_settings(image.pairs[0]).frames is None
    video = parse_spec(GOOD.replace("size: 32", "size: 32\nframes: 9"))
    assert video.frames == 9 and video.run_settings(video.pairs[0]).frames == 9
    assert video.fingerprint() != image.fingerprint()


def test_negative_word_outside_the_vocabulary():
    from negprompt.shapes.model import build_tokenizer

    text = GOOD.replace("a photo of a cat, negative: red hat", "a red circle, negative: a dragon")
    spec = parse_spec(
        text.replace("a woman in the street, negative: glasses, related: woman", "a red circle, negative: a hat")
    )
    with pytest.raises(
        SpecError, match=r"<spec>:9: negative 'a dragon' has word\(s\) 'dragon' unknown.*known words: .*hat"
    ):
        check_vocabulary(spec, build_tokenizer())


# ---------------------------------------------------------------- runner


def write_spec(tmp_path, tiny_sd_dir, text=GOOD):
    path = tmp_path / "spec.yaml"
    path.write_text(text.replace("MODEL", str(tiny_sd_dir)))
    return path


def read_rows(folder):
    with open(folder / RESULTS_FILE, newline="") as handle:
        return sorted(tuple(r.values()) for r in csv.DictReader(handle))


def test_resume_after_a_crash_gives_the_same_table(tiny_sd_dir, tmp_path, monkeypatch):
    from negprompt.analysis.spec import load_spec

    spec = load_spec(write_spec(tmp_path, tiny_sd_dir))
    run_study(spec, tmp_path / "straight", progress=False)
    straight = read_rows(tmp_path / "straight")
    assert len(straight) == 2 * 2 * 3 * 2  # pairs × seeds × steps × definitions

    def crash(index):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(spec, tmp_path / "crashed", progress=False, on_pair_done=crash)
    with open(tmp_path / "crashed" / RESULTS_FILE, "a") as handle:
        handle.write("1,adjective,a woman in the str")  # a write torn by kill -9
    calls = []
    original = study_module.run_pair
    monkeypatch.setattr(study_module, "run_pair", lambda *a, **k: calls.append(a[1]) or original(*a, **k))
    run_study(spec, tmp_path / "crashed", progress=False)
    assert calls == [1]  # only the missing pair was computed
    assert read_rows(tmp_path / "crashed") == straight


@pytest.mark.parametrize("kept", [0, 5])
def test_resume_after_the_header_was_cut_short(tiny_sd_dir, tmp_path, kept):
    """A disk that fills before the first row leaves an empty results.csv, or part of its header: the
    rerun starts the table again instead of refusing it."""
    from negprompt.analysis.spec import load_spec

    spec = load_spec(write_spec(tmp_path, tiny_sd_dir))
    run_study(spec, tmp_path / "straight", progress=False)
    run_study(spec, tmp_path / "cut", progress=False)
    results = tmp_path / "cut" / RESULTS_FILE
    results.write_bytes(results.read_bytes()[:kept])
    run_study(spec, tmp_path / "cut", progress=False)
    assert results.read_bytes() == (tmp_path / "straight" / RESULTS_FILE).read_bytes()


def test_results_of_another_spec_are_refused_and_untouched(tiny_sd_dir, tmp_path):
    from negprompt.analysis.spec import load_spec

    first = load_spec(write_spec(tmp_path, tiny_sd_dir))
    run_study(first, tmp_path / "out", progress=False)
    before = (tmp_path / "out" / RESULTS_FILE).read_bytes()
    other = load_spec(write_spec(tmp_path, tiny_sd_dir, GOOD.replace("scale: 5", "scale: 6")))
    with pytest.raises(SpecError, match="another spec"):
        run_study(other, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / RESULTS_FILE).read_bytes() == before


def test_study_and_report_commands(tiny_sd_dir, tmp_path, capsys):
    spec = write_spec(tmp_path, tiny_sd_dir)
    assert main(["study", str(spec), "--out", str(tmp_path / "s"), "-q"]) == 0
    assert "UNet evaluations" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "s")]) == 0
    report = (tmp_path / "s" / "report.md").read_text()
    assert "| noun |" in report and "| adjective |" in report and "peak" in report
    assert (tmp_path / "s" / "curves_article.png").exists() and (tmp_path / "s" / "pairs_released.png").exists()
    report, _ = make_report(tmp_path / "s")


def test_study_bad_spec_exit_code(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent(GOOD).replace("steps: 3", "stepz: 3"))
    assert main(["study", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "unknown field 'stepz'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (("negative: glasses,", "negative: " + "glasses " * 80 + ","), "over the tokenizer's limit of 77"),
        (("size: 32", "size: 30"), "not a positive multiple of"),
    ],
)
def test_a_pair_that_cannot_run_fails_before_any_work(tiny_sd_dir, tmp_path, capsys, edit, message):
    """Every pair's run and capture are built and checked first: no folder, no spec.json, no result."""
    spec = write_spec(tmp_path, tiny_sd_dir, GOOD.replace(*edit))
    assert main(["study", str(spec), "--out", str(tmp_path / "o"), "-q"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_spec_words_are_split_from_punctuation(tmp_path):
    from negprompt.analysis.spec import load_spec, prompt_words

    assert prompt_words("Trees, fog. A night sky!") == ["trees", "fog", "a", "night", "sky"]
    path = tmp_path / "p.yaml"
    path.write_text(
        GOOD.replace("negative: red hat}", "negative: 'trees, fog.'}").replace(
            "negative: glasses, related: woman}", "negative: 'trees, fog', word: trees}"
        )
    )
    spec = load_spec(path)
    assert [p.word for p in spec.pairs] == ["fog", "trees"]


def test_a_study_of_nag_records_the_negative_read_inside_attention(tiny_sd_dir, tmp_path, capsys):
    sd_spec = parse_spec(GOOD)
    assert "rule" not in sd_spec.to_json()  # specs without the field keep their fingerprint
    spec = write_spec(tmp_path, tiny_sd_dir, GOOD.replace("steps: 3", "steps: 3\nrule: nag"))
    assert main(["study", str(spec), "--out", str(tmp_path / "nag"), "-q"]) == 0, capsys.readouterr().err
    with open(tmp_path / "nag" / RESULTS_FILE, newline="") as handle:
        rows = list(csv.DictReader(handle))
    ratios = [float(r["r_t"]) for r in rows]
    assert rows and all(math.isfinite(v) and v > 0 for v in ratios)
    assert main(["report", str(tmp_path / "nag")]) == 0
    assert "rule nag" in (tmp_path / "nag" / "report.md").read_text()
