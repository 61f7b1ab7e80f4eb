"""The bundled shapes-world model: its component configurations, built from scratch.

A pixel-space text-to-image model in Stable Diffusion's parts: a diffusers
``UNet2DConditionModel`` with cross-attention at every resolution, a small transformers
``CLIPTextModel`` and the word-level tokenizer of :mod:`negprompt.shapes.tokenizer`. No VAE.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from negprompt.shapes.scene import IMAGE_SIZE, VOCABULARY
from negprompt.shapes.tokenizer import BOS, EOS, PAD, build_word_tokenizer

TEXT_MAX_LENGTH = 16  # the longest caption has 11 words, plus start and end tokens


@dataclass(frozen=True)
class ShapesModelConfig:
    """The few numbers that size the bundled model."""

    unet_widths: tuple[int, ...] = (32, 64, 128)
    head_dim: int = 16
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    pooled_text_embedding: bool = True  # attention-pooled text added to the time embedding
    full_res_self_attention: bool = False  # cross-attention only at the highest resolution
    full_res_attention: bool = False  # attention layers at the highest resolution too
    guidance_embedding_dim: int = 0  # > 0: the UNet takes the guidance scale as an input (a distilled student)

    def to_json(self) -> dict:
        return asdict(self)


def build_tokenizer() -> PreTrainedTokenizerFast:
    return build_word_tokenizer(VOCABULARY, TEXT_MAX_LENGTH)


def build_text_encoder(config: ShapesModelConfig, tokenizer: PreTrainedTokenizerFast) -> CLIPTextModel:
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_width,
        intermediate_size=4 * config.text_width,
        projection_dim=config.text_width,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=TEXT_MAX_LENGTH,
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
    )
    return CLIPTextModel(text_config)


def build_unet(config: ShapesModelConfig) -> UNet2DConditionModel:
    levels = len(config.unet_widths)
    first_down = "CrossAttnDownBlock2D" if config.full_res_attention else "DownBlock2D"
    last_up = "CrossAttnUpBlock2D" if config.full_res_attention else "UpBlock2D"
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        down_block_types=(first_down,) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + (last_up,),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=config.unet_widths,
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=config.text_width,
        attention_head_dim=tuple(w // config.head_dim for w in config.unet_widths),
        only_cross_attention=(not config.full_res_self_attention,) + (False,) * (levels - 1),
        addition_embed_type="text" if config.pooled_text_embedding else None,
        addition_embed_type_num_heads=config.text_heads,
        time_cond_proj_dim=config.guidance_embedding_dim or None,
    )


def build_scheduler() -> DDPMScheduler:
    """Cosine noise schedule (Nichol & Dhariwal 2021), suited to 32×32 pixels; ε-prediction."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
