"""The benchmark scripts run: the GPU one says clearly that it needs CUDA, the SDXL one on a tiny run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))


def test_bench_gpu_without_cuda_exits_with_a_clear_message(benchmarks_on_path, monkeypatch, capsys, tmp_path):
    import bench_gpu
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["bench_gpu.py", "--out", str(tmp_path / "gpu.json")])
    assert bench_gpu.main() == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU here" in err and "bench_sdxl.py" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "gpu.json").exists()


def test_bench_gpu_tiny_mode_runs_every_preset_at_the_real_latent_factor(benchmarks_on_path, tmp_path):
    import bench_gpu

    out = tmp_path / "gpu.json"
    assert bench_gpu.main(["--tiny", "--device", "cpu", "--size", "32", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["models"]) == {"sd15@32", "sdxl@32", "sd3@32", "flux@32"}
    for name, measured in result["models"].items():
        assert measured["latent_factor"] == 8, name
        assert set(measured["ratios"]) == set(measured["targets"]) and all(v > 0 for v in measured["ratios"].values())
        assert set(measured["profile"]) == {"ours", "diffusers", "capture", "plain", "nag", "vsf"}
        assert all(0 < p["inside_denoiser_share"] < 1 for p in measured["profile"].values()), name
    assert result["models"]["sd3@32"]["image_tokens"] == result["models"]["flux@32"]["image_tokens"] == (32 // 16) ** 2


def test_bench_sdxl_tiny_run_writes_its_ratios(benchmarks_on_path, monkeypatch, tmp_path):
    import bench_sdxl

    out = tmp_path / "sdxl.json"
    argv = ["bench_sdxl.py", "--size", "32", "--steps", "2", "--batch", "1", "--repeats", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench_sdxl.main()
    result = json.loads(out.read_text())
    assert set(result["ratios"]) == set(result["targets"]) and all(v > 0 for v in result["ratios"].values())
    assert result["settings"]["preset"] == "tiny" and result["median_seconds"]["diffusers"] > 0


def test_bench_mmdit_tiny_run_writes_its_ratios(benchmarks_on_path, monkeypatch, tmp_path):
    import bench_mmdit

    out = tmp_path / "mmdit.json"
    argv = ["bench_mmdit.py", "--size", "32", "--steps", "2", "--batch", "1", "--repeats", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench_mmdit.main()
    result = json.loads(out.read_text())
    assert set(result["models"]) == {"tiny-sd3", "tiny-flux"}
    for measured in result["models"].values():
        assert set(measured["ratios"]) == set(measured["targets"]) and all(v > 0 for v in measured["ratios"].values())
        assert measured["median_seconds"]["diffusers"] > 0


def test_bench_families_tiny_run_writes_a_ratio_per_family(benchmarks_on_path, monkeypatch, tmp_path):
    import bench_families

    out = tmp_path / "families.json"
    argv = ["bench_families.py", "--size", "32", "--steps", "2", "--batch", "1", "--repeats", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench_families.main()
    result = json.loads(out.read_text())
    assert set(result["families"]) == {"chroma", "flux2-klein", "qwen-image", "z-image"}
    for measured in result["families"].values():
        assert measured["ratios"]["ours_vs_diffusers"] > 0 and measured["median_seconds"]["diffusers"] > 0


def test_bench_bundled_device_without_cuda_exits_with_one_line(benchmarks_on_path, monkeypatch, capsys, tmp_path):
    import bench_bundled_device
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_bundled_device.main(["--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU here" in err and "--device cpu" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b.json").exists()


def test_bench_bundled_device_runs_its_phases_and_the_command_on_the_cpu(benchmarks_on_path, tmp_path):
    import bench_bundled_device

    out = tmp_path / "bundled.json"
    argv = ["--device", "cpu", "--steps", "1", "--repeats", "1", "--commands", "generate", "--out", str(out)]
    assert bench_bundled_device.main(argv) == 0
    result = json.loads(out.read_text())
    seconds = result["phases"]["seconds"]
    assert {"load the bundled model", "the demo's runs, warm"} <= set(seconds) and all(s >= 0 for s in seconds.values())
    warm = result["phases"]["warm_run"]
    assert warm["unet_calls"] > 0 and 0 < warm["inside_unet_share"] <= 1
    generate = result["commands"]["generate"]
    assert generate["seconds"]["cpu"][0] > 0 and generate["speed_up"] == 1.0  # cpu against itself
    assert generate["argv"][:2] == ["-m", "negprompt"] and "--device" in generate["argv"]
