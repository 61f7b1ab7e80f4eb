"""The bounds of every number a run takes, with their reasons: one place, importable without torch
(the command line checks them before it imports the model code)."""

MAX_STEPS = 1000  # inference steps: the schedules have 1000 training timesteps
MAX_SIDE = 8192  # pixels: SDXL and FLUX are trained up to 2048, and an 8192² image's attention outgrows any GPU
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits
MAX_IMAGES = 10_000  # images of one run: their pixels are held in memory together
# Frames of one video (Wan: 4k + 1; trained at 81, 5 s at 16 fps): 10 001 frames are over 10 minutes at 16 fps.
MAX_FRAMES = 10_001
# Bytes of a run's decoded videos, float32 (B × F × H × W × 3 × 4), held in memory together: 64 GiB is more than
# a workstation holds (Wan's 81 frames of 720 × 1280 are 0.9 GB a video); checked before anything is sampled.
MAX_VIDEO_BYTES = 64 * 2**30
# Guidance scales must lie in [−MAX_SCALE, MAX_SCALE]: SD is used at 1–20 and the bundled model at 14;
# at 100 the guided prediction is saturated, so a larger scale is a typo, not a choice.
MAX_SCALE = 100.0
# Effective word weights (nested weights multiplied) must lie in [−MAX_WEIGHT, MAX_WEIGHT]. Measured on
# the bundled model (docs/guidance.md, "Prompt weights are bounded"): at 4 the weighted thing blurs, at 8
# the image is noise; SD users keep weights within 0.5–2.
MAX_WEIGHT = 4.0
# Training timesteps of a model's scheduler (its ``num_train_timesteps``): the scheduler builds arrays of
# this length when it loads (10¹² would take minutes, then fail for memory); released models use 1000.
MAX_TRAIN_TIMESTEPS = 10_000
# Vectors of one textual-inversion embedding: CLIP text encoders read 77 tokens, start and end included,
# so a longer embedding never fits in a prompt (the shared ones have 1–75).
MAX_EMBEDDING_VECTORS = 75
MAX_EMBEDDING_WIDTH = 16_384  # numbers in one embedding vector: CLIP-L takes 768, OpenCLIP-G 1280
# Brackets nested in a prompt: 15 levels of ( ) already pass the weight bound, and deeper nesting is a
# typo (1000 levels would exhaust the parser's recursion).
MAX_PROMPT_NESTING = 32
# Bytes of a PNG's settings text (its negprompt chunk, after decompression): a run of MAX_IMAGES seeds
# writes about 250 kB; Pillow bounds one text chunk at about the same (1 MiB).
MAX_SETTINGS_BYTES = 1_000_000
# Bytes of a model's JSON configuration file (model_index.json, config.json, scheduler_config.json):
# real ones are under 100 kB.
MAX_CONFIG_BYTES = 16 * 2**20
# MiB an attention capture may be allowed to store (``attend --memory-limit``): 16 TiB is beyond any
# machine's memory, so a larger limit is a typo (and 1e308 MiB would overflow the byte count).
MAX_CAPTURE_MIB = 16 * 2**20
