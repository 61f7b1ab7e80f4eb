"""The smallest video model for the shapes world: the bundled UNet inflated in time.

diffusers' ``UNet3DConditionModel`` (the ModelScope text-to-video layout) runs every spatial layer of an
image UNet on each frame (frames folded into the batch) and adds temporal mixing after each of them: a
temporal convolution (kernel 3 along time) after every ResNet block and a temporal self-attention after
every spatial transformer, plus one temporal transformer at the input. Built with the bundled image
model's widths, head width and text width (:class:`~negprompt.shapes.model.ShapesModelConfig`), its
spatial weights have the image UNet's names and shapes, so an exported image model can start it
(:func:`load_image_weights`) with its temporal layers at zero (:func:`start_temporal_layers_at_zero`):
at step 0 the video model denoises each frame as the image model would, but for the pooled text (next).

The bundled UNet adds an attention-pooled text vector to the time embedding; the 3-D UNet has no such
layer, so the text encoder's pooled output (the end token's state) enters through the time embedding's
extra input (``time_cond_proj_dim``), which starts at zero when inflated (random otherwise).

Input (B, 3, F, 32, 32) pixels in [−1, 1], text (B, L, D); output ε of the same shape as the input.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet3DConditionModel
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

from negprompt.errors import NegpromptError
from negprompt.files import write_json
from negprompt.models.loading import ModelLoadError, load_components
from negprompt.shapes.model import ShapesModelConfig
from negprompt.shapes.scene import IMAGE_SIZE

VIDEO_FILE = "video.json"  # what an exported video model says of itself (no model_index.json: not an image model)


def build_video_unet(config: ShapesModelConfig) -> UNet3DConditionModel:
    """The bundled UNet's levels in 3-D: full resolution without attention, cross-attention below it."""
    levels = len(config.unet_widths)
    if any(width % config.head_dim for width in config.unet_widths):
        raise NegpromptError(f"the video UNet needs widths divisible by the head width {config.head_dim}")
    return UNet3DConditionModel(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock3D",) + ("CrossAttnDownBlock3D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock3D",) * (levels - 1) + ("UpBlock3D",),
        block_out_channels=config.unet_widths,
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=config.text_width,
        # the 3-D blocks read this as the head width (width / it heads per level, as the image UNet has);
        # the input's temporal transformer has 8 heads of it
        attention_head_dim=config.head_dim,
        time_cond_proj_dim=config.text_width,  # the pooled text, added to the time embedding
    )


def predict_noise(unet: UNet3DConditionModel, noisy: torch.Tensor, timesteps: torch.Tensor, encoded) -> torch.Tensor:
    """ε for noisy clips (B, 3, F, H, W) at ``timesteps`` (B,), given the text encoder's output."""
    return unet(noisy, timesteps, encoded.last_hidden_state, timestep_cond=encoded.pooler_output).sample


def inflate(video_unet: UNet3DConditionModel, image_state: dict[str, torch.Tensor]) -> list[str]:
    """Copies an image UNet's weights into the video UNet where names match (1×1 convolutions of the image
    UNet's attention projections become the linear layers of the 3-D UNet's). Returns the image weights
    that have no place (the attention-pooled text embedding)."""
    target = video_unet.state_dict()
    copied, left = {}, []
    for key, value in image_state.items():
        if key in target and value.numel() == target[key].numel():
            copied[key] = value.reshape(target[key].shape)
        else:
            left.append(key)
    video_unet.load_state_dict(copied, strict=False)
    start_temporal_layers_at_zero(video_unet)
    return left


def start_temporal_layers_at_zero(video_unet: UNet3DConditionModel) -> None:
    """Zeroes the output projection of every temporal transformer (the input's and each level's) and the
    pooled text's input, so that each residual temporal layer starts as the identity: with the temporal
    convolutions, which diffusers already starts at zero, the model then denoises every frame as the
    inflated image UNet does without its pooled text (ModelScope's and AnimateDiff's start)."""
    with torch.no_grad():
        for module in video_unet.modules():
            if isinstance(module, TransformerTemporalModel):
                module.proj_out.weight.zero_()
                module.proj_out.bias.zero_()
        video_unet.time_embedding.cond_proj.weight.zero_()


def load_image_weights(model_dir: str | Path, unet: UNet3DConditionModel, text_encoder: torch.nn.Module) -> None:
    """Starts the video model from an exported image model: its text encoder whole, its UNet inflated."""
    try:
        source = load_components(model_dir)
    except ModelLoadError as error:
        raise NegpromptError(f"--init-from {model_dir}: not an exported model ({error})") from None
    try:
        text_encoder.load_state_dict(source.text_encoder.state_dict())
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise NegpromptError(f"--init-from {model_dir}: weights do not fit this model config ({first})") from None
    left = inflate(unet, source.unet.state_dict())
    if any(not key.startswith("add_embedding.") for key in left):
        raise NegpromptError(f"--init-from {model_dir}: its UNet does not fit the video UNet (first {left[0]})")


def save_video_model(parts: dict, frames: int, folder: Path) -> None:
    """Writes the video model's parts (``unet``, ``text_encoder``, ``tokenizer``, ``scheduler``) in diffusers
    layout and ``video.json`` (frames, how the text enters); safetensors only."""
    for name in ("unet", "text_encoder"):
        parts[name].save_pretrained(folder / name, safe_serialization=True)
    parts["tokenizer"].save_pretrained(str(folder / "tokenizer"))
    parts["scheduler"].save_pretrained(folder / "scheduler")
    write_json(folder / VIDEO_FILE, {"frames": frames, "pooled_text": "timestep_cond"}, indent=2)
