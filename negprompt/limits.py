"""The bounds of every number a run takes, with their reasons: one place, importable without torch
(the command line checks them before it imports the model code)."""

MAX_STEPS = 1000  # inference steps: the schedules have 1000 training timesteps
MAX_SIDE = 8192  # pixels: SDXL and FLUX are trained up to 2048, and an 8192² image's attention outgrows any GPU
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits
MAX_IMAGES = 10_000  # images of one run: their pixels are held in memory together
# Guidance scales must lie in [−MAX_SCALE, MAX_SCALE]: SD is used at 1–20 and the bundled model at 14;
# at 100 the guided prediction is saturated, so a larger scale is a typo, not a choice.
MAX_SCALE = 100.0
# Effective word weights (nested weights multiplied) must lie in [−MAX_WEIGHT, MAX_WEIGHT]. Measured on
# the bundled model (docs/guidance.md, "Prompt weights are bounded"): at 4 the weighted thing blurs, at 8
# the image is noise; SD users keep weights within 0.5–2.
MAX_WEIGHT = 4.0
