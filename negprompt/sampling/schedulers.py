"""Scheduler names users type, mapped to diffusers scheduler classes.

``default`` keeps the model's own scheduler (the class in its ``scheduler`` folder). Any other name
builds that class from the model's scheduler config, so the noise schedule (betas, prediction type,
timestep spacing) stays the model's.
"""

from __future__ import annotations

import inspect
from typing import Any

from negprompt.errors import NegpromptError

# name → (diffusers scheduler class name, settings over the model's config). Class names, not
# classes: the command line lists the names without importing diffusers.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
}
SCHEDULER_NAMES = ("default", *SCHEDULERS)


class SchedulerError(NegpromptError):
    """An unknown scheduler name."""


def is_flow_matching(scheduler: Any) -> bool:
    """Whether ``scheduler`` is a flow-matching one: diffusers' ``FlowMatch…`` classes (SD3, FLUX) or a
    multistep solver on flow sigmas predicting velocities (Wan's ``UniPCMultistepScheduler`` with
    ``prediction_type="flow_prediction"``, timesteps σ·1000)."""
    if type(scheduler).__name__.startswith("FlowMatch"):
        return True
    return getattr(scheduler, "config", {}).get("prediction_type") == "flow_prediction"


def make_scheduler(name: str, base: Any) -> Any:
    """A fresh scheduler called ``name`` with the noise schedule of ``base`` (the model's scheduler)."""
    if name == "default":
        return type(base).from_config(base.config)
    if is_flow_matching(base):
        raise SchedulerError(
            f"scheduler {name!r} samples an ε/v diffusion; this model is trained with flow matching and runs its own "
            f"{type(base).__name__}: choose 'default'"
        )
    if name not in SCHEDULERS:
        raise SchedulerError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULER_NAMES)}")
    import diffusers

    class_name, overrides = SCHEDULERS[name]
    cls = getattr(diffusers, class_name)
    overrides = dict(overrides)
    if "clip_sample" in inspect.signature(cls.__init__).parameters and "clip_sample" not in base.config:
        # A config that never mentions clipping comes from a latent model (SD's PNDM config):
        # clipping latents to [-1, 1] would be wrong, and diffusers' pipelines switch it off too.
        overrides["clip_sample"] = False
    return cls.from_config(base.config, **overrides)
