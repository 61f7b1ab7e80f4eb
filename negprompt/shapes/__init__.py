"""The bundled synthetic "shapes world": a package on top of the toolkit, never the reverse.

- :mod:`~negprompt.shapes.scene`: procedural 32×32 scenes with known attributes, and their captions;
- :mod:`~negprompt.shapes.clips`: short clips of the world (a moving shape, a hat or sun that comes in);
- :mod:`~negprompt.shapes.detectors`: read every attribute back from pixels (ground truth), built on
  ``detector_thresholds``, ``detector_pixels`` and ``detector_measures``; validated by
  :mod:`~negprompt.shapes.stress`; :mod:`~negprompt.shapes.clip_measures`: the detectors on clip frames
  and the temporal measures of negatives (per-frame removal, first appearance, flicker);
- :mod:`~negprompt.shapes.model`, :mod:`~negprompt.shapes.tokenizer`: the bundled model's architecture;
  :mod:`~negprompt.shapes.video_model`: the tiny video model (the same UNet inflated in time);
- :mod:`~negprompt.shapes.training`: seeded, checkpointed, resumable training on CPU (its settings and
  data in ``training_config``, its files in ``checkpoints``);
- :mod:`~negprompt.shapes.evaluation`, :mod:`~negprompt.shapes.methods`: the model's quality and the
  ranking of negative-prompt rules, both scored with the detectors;
- :mod:`~negprompt.shapes.regions`: the detectors as a region finder for ``negprompt edit``;
- :mod:`~negprompt.shapes.commands`: ``train``, ``evaluate``, ``bench-methods``, ``edit-sweep``.

The toolkit finds the last two through entry points (``pyproject.toml``: groups ``negprompt.commands``
and ``negprompt.region_finders``); no module outside this package imports it (``tests/test_layers.py``).
"""
