"""Shared fixtures: a tiny Stable Diffusion, a tiny SDXL and a tiny shapes-world model built from configs (random weights, no downloads)."""

from __future__ import annotations

import os

# A lowered ATen kernel set (ATEN_CPU_CAPABILITY=default or avx2) plays an older CPU; oneDNN must play
# it too, else on an AMX CPU PyTorch's bfloat16 attention refuses to run ("pack_vnni2 is only supported
# when avx512 is supported"). Set before torch starts; launched workers inherit it.
if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("default", "avx2"):
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Two threads (the machine the goldens were recorded on), or what OMP_NUM_THREADS asks for: a run
# with OMP_NUM_THREADS=1 takes other CPU code paths (tests/golden/README.md).
THREADS = int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1)))
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def threads_restored():
    """Every test starts with THREADS: a command run in-process may set its own (``train --threads``)."""
    torch.set_num_threads(THREADS)
    yield


@pytest.fixture(scope="session")
def tiny_sd():
    from negprompt.testing.tiny_sd import build_tiny_sd

    return build_tiny_sd(seed=0)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory, tiny_sd):
    """The tiny SD saved as a diffusers directory (safetensors), as a user's checkpoint would be."""
    from negprompt.models.saving import save_components

    folder = tmp_path_factory.mktemp("tiny-sd")
    save_components(tiny_sd, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sdxl():
    from negprompt.testing.tiny_sd import build_tiny_sdxl

    return build_tiny_sdxl(seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory, tiny_sdxl):
    """The tiny SDXL saved as a diffusers directory (StableDiffusionXLPipeline, safetensors)."""
    from negprompt.models.saving import save_components

    folder = tmp_path_factory.mktemp("tiny-sdxl")
    save_components(tiny_sdxl, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_shapes_dir(tmp_path_factory):
    """An untrained shapes-world model (the bundled architecture at toy width) saved as a directory.

    Its negprompt.json declares only the world's region finder (the sampling defaults stay diffusers').
    """
    import json

    from helpers import shapes_components

    from negprompt.models.saving import save_components
    from negprompt.shapes.model import ShapesModelConfig
    from negprompt.shapes.regions import NAME

    torch.manual_seed(0)
    config = ShapesModelConfig(unet_widths=(16, 32), head_dim=8, text_width=32, text_layers=1, text_heads=2)
    components = shapes_components(config)
    folder = tmp_path_factory.mktemp("tiny-shapes")
    save_components(components, folder)
    (folder / "negprompt.json").write_text(json.dumps({"region_finder": NAME}) + "\n")
    return folder


def pytest_terminal_summary(terminalreporter):
    """Reports how many cases the fuzz tests generated (the issue asks for the number in CI), and
    whether the goldens were also checked bit for bit (only on the machine that recorded them)."""
    import sys

    golden = sys.modules.get("test_golden")
    if golden is not None:
        if golden.ON_THE_RECORDING_MACHINE:
            terminalreporter.write_line(
                f"goldens: {len(golden.EXACT_CHECKS)} cases bit-identical (the recording machine)"
            )
        else:
            recorded, here = golden.RECORD["recorded_on"], golden.machine()
            differs = ", ".join(f"{k} {recorded.get(k)!r} → {here[k]!r}" for k in here if recorded.get(k) != here[k])
            terminalreporter.write_line(
                f"goldens: compared within tolerance only (not the recording machine: {differs})"
            )
    fuzz = sys.modules.get("test_fuzz")
    if fuzz is None or not fuzz.CASES:
        return
    total = sum(fuzz.CASES.values())
    detail = ", ".join(f"{name}: {count}" for name, count in sorted(fuzz.CASES.items()))
    terminalreporter.write_line(f"fuzz: {total} generated cases ({detail})")


@pytest.fixture(scope="session")
def tiny_sd3():
    from negprompt.testing.tiny_mmdit import build_tiny_sd3

    return build_tiny_sd3(seed=0)


@pytest.fixture(scope="session")
def tiny_flux():
    from negprompt.testing.tiny_mmdit import build_tiny_flux

    return build_tiny_flux(seed=0)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory, tiny_sd3):
    """The tiny SD3 saved as a diffusers directory (StableDiffusion3Pipeline, safetensors)."""
    from negprompt.models.saving import save_components

    return save_components(tiny_sd3, tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory, tiny_flux):
    """The tiny FLUX saved as a diffusers directory (FluxPipeline, safetensors)."""
    from negprompt.models.saving import save_components

    return save_components(tiny_flux, tmp_path_factory.mktemp("tiny-flux"))
