"""The one denoising loop of negprompt.

Each step evaluates every branch the guidance needs at that step in ONE batched UNet call, combines
the branch predictions with the guidance rule and advances the scheduler. Branches are named
(``positive``, ``negative``, ``unconditional`` …), never found by their position in the batch.

Observers see each step through a read-only :class:`StepInfo`; a ``UNetCallHook`` is told, before
each UNet call, which step it is and how the batch is laid out (attention capture uses this).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from negprompt.errors import NegpromptError
from negprompt.guidance.plan import UNCONDITIONAL, Guidance
from negprompt.models.components import Components
from negprompt.sampling.prompts import encode_prompts


class SamplingError(NegpromptError):
    """Settings the sampler cannot run with."""


MAX_STEPS = 1000


@dataclass(frozen=True)
class StepInfo:
    """What one step saw and did. Tensors are copies: changing them changes nothing.

    latents: x_t the step started from, (B, C, h, w); predictions: each evaluated branch's
    ε (or v), (B, C, h, w) by branch name; guided: the combined prediction; denoised: x̂₀
    estimated from ``guided``, (B, C, h, w), in latent space.
    """

    step: int
    num_steps: int
    timestep: float
    latents: torch.Tensor
    predictions: dict[str, torch.Tensor]
    guided: torch.Tensor
    denoised: torch.Tensor


StepCallback = Callable[[StepInfo], None]


class UNetCallHook(Protocol):
    """Told before each UNet call which step it is and which branch each batch block holds."""

    def before_unet_call(self, step: int, timestep: float, branches: Sequence[str], batch_size: int) -> None: ...


@dataclass
class SampleOutput:
    """Decoded images (B, H, W, 3) float32 in [0, 1], the final latents and, on request, the trace."""

    images: np.ndarray
    latents: torch.Tensor
    trace: list[StepInfo] | None
    unet_batch_rows: int  # Σ over steps of the rows fed to the UNet (branches × images)
    num_steps: int  # UNet calls (len of the scheduler's timesteps)


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded: images drawn alone or in a batch start from equal noise."""
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def initial_noise(generators: Sequence[torch.Generator], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """(B, *shape) standard normal noise, image i from generator i (as diffusers' randn_tensor)."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=dtype) for g in generators])


def _alpha_bar(scheduler: Any, timestep: torch.Tensor) -> torch.Tensor:
    """ᾱ_t at a (possibly fractional) timestep, interpolating σ = √((1−ᾱ)/ᾱ) as Euler-type schedulers do."""
    alphas_cumprod = scheduler.alphas_cumprod.double()
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().numpy()
    sigma = float(np.interp(float(timestep), np.arange(len(sigmas)), sigmas))
    return torch.tensor(1.0 / (1.0 + sigma**2))


def predicted_clean(
    scheduler: Any, model_input: torch.Tensor, prediction: torch.Tensor, timestep: torch.Tensor
) -> torch.Tensor:
    """x̂₀ from the model's input x_t (variance-preserving scale) and its prediction.

    ε-prediction: x̂₀ = (x_t − √(1−ᾱ)ε)/√ᾱ; v-prediction: x̂₀ = √ᾱ x_t − √(1−ᾱ) v.
    """
    alpha_bar = _alpha_bar(scheduler, timestep).to(prediction.dtype)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (model_input - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()
    if kind == "v_prediction":
        return alpha_bar.sqrt() * model_input - (1 - alpha_bar).sqrt() * prediction
    return prediction  # "sample"


def decode(components: Components, latents: torch.Tensor) -> np.ndarray:
    """Latents → images (B, H, W, 3) float32 in [0, 1]; without a VAE the latents are the pixels."""
    with torch.no_grad():
        if components.vae is not None:
            latents = latents / components.vae.config.scaling_factor
            pixels = components.vae.decode(latents.to(components.vae.dtype), return_dict=False)[0]
        else:
            pixels = latents
    pixels = (pixels / 2 + 0.5).clamp(0, 1)
    return pixels.cpu().permute(0, 2, 3, 1).float().numpy()


@torch.inference_mode()
def sample(
    components: Components,
    guidance: Guidance,
    scheduler: Any,
    seeds: Sequence[int],
    num_steps: int,
    height: int,
    width: int,
    callback: StepCallback | None = None,
    keep_trace: bool = False,
    unet_hooks: Sequence[UNetCallHook] = (),
    progress: bool = False,
    eta: float = 0.0,
) -> SampleOutput:
    """Runs the denoising loop for one image per seed and returns the decoded images.

    ``scheduler`` is consumed (its state advances); pass a fresh one per call. ``num_steps`` is the
    number of inference steps given to ``scheduler.set_timesteps``; the loop runs one UNet call per
    entry of ``scheduler.timesteps`` and windows count those calls.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= MAX_STEPS:
        raise SamplingError(f"steps must be an integer in 1–{MAX_STEPS}, got {num_steps!r}")
    if not seeds:
        raise SamplingError("give at least one seed")
    multiple = components.size_multiple
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % multiple:
            raise SamplingError(f"{name} {value} is not a positive multiple of {multiple} (the model's size factor)")

    device, dtype = components.device, components.dtype
    batch = len(seeds)
    scheduler.set_timesteps(num_steps, device=device)
    timesteps = scheduler.timesteps
    calls = len(timesteps)
    guidance.validate(calls)

    # Encode each branch's prompts once; the empty prompt only if some step needs it.
    needed = {name for step in range(calls) for name in guidance.branches_at(step, calls)}
    prompts = {name: term.prompts_for(batch) for name, term in guidance.terms.items() if name in needed}
    if UNCONDITIONAL in needed:
        prompts[UNCONDITIONAL] = [""] * batch
    embeddings = {
        name: encode_prompts(components.tokenizer, components.text_encoder, texts).to(device)
        for name, texts in prompts.items()
    }

    factor = components.latent_factor
    channels = components.unet.config.in_channels
    generators = make_generators(seeds)
    latents = initial_noise(generators, (channels, height // factor, width // factor), dtype).to(device)
    latents = latents * scheduler.init_noise_sigma

    step_parameters = inspect.signature(scheduler.step).parameters
    step_kwargs: dict[str, Any] = {}
    if "eta" in step_parameters:
        step_kwargs["eta"] = eta
    if "generator" in step_parameters:
        step_kwargs["generator"] = generators

    trace: list[StepInfo] | None = [] if keep_trace else None
    rows = 0
    for step, t in enumerate(tqdm(timesteps, disable=not progress, unit="step", leave=False)):
        branches = guidance.branches_at(step, calls)
        model_input = scheduler.scale_model_input(latents, t)
        unet_input = torch.cat([model_input] * len(branches))
        context = torch.cat([embeddings[name] for name in branches])
        for hook in unet_hooks:
            hook.before_unet_call(step, float(t), branches, batch)
        output = components.unet(unet_input, t, encoder_hidden_states=context, return_dict=False)[0]
        rows += output.shape[0]
        predictions = dict(zip(branches, output.chunk(len(branches))))
        guided = guidance.combine(predictions, step, calls)
        if callback is not None or trace is not None:
            info = StepInfo(
                step=step,
                num_steps=calls,
                timestep=float(t),
                latents=latents.detach().clone(),
                predictions={k: v.detach().clone() for k, v in predictions.items()},
                guided=guided.detach().clone(),
                denoised=predicted_clean(scheduler, model_input, guided, t).detach(),
            )
            if callback is not None:
                callback(info)
            if trace is not None:
                trace.append(_to_cpu(info))
        latents = scheduler.step(guided, t, latents, **step_kwargs, return_dict=False)[0]

    return SampleOutput(
        images=decode(components, latents),
        latents=latents,
        trace=trace,
        unet_batch_rows=rows,
        num_steps=calls,
    )


def _to_cpu(info: StepInfo) -> StepInfo:
    return StepInfo(
        step=info.step,
        num_steps=info.num_steps,
        timestep=info.timestep,
        latents=info.latents.cpu(),
        predictions={k: v.cpu() for k, v in info.predictions.items()},
        guided=info.guided.cpu(),
        denoised=info.denoised.cpu(),
    )
