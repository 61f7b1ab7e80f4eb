"""Helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path


def assert_usage_error(code: int, capsys, message: str, *never_written: Path) -> None:
    """A user error: exit code 2, one line on stderr naming the problem, and no output written."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("negprompt: error: ") and len(err.splitlines()) == 1, err
    assert message in err, err
    for path in never_written:
        assert not path.exists(), path


def shapes_components(config=None):
    """The shapes-world model's parts built from ``config`` (random weights), in eval mode."""
    from negprompt.models.components import Components
    from negprompt.shapes.model import (
        ShapesModelConfig,
        build_scheduler,
        build_text_encoder,
        build_tokenizer,
        build_unet,
    )

    config = config or ShapesModelConfig()
    tokenizer = build_tokenizer()
    return Components(build_unet(config), build_text_encoder(config, tokenizer), tokenizer, build_scheduler()).eval()
