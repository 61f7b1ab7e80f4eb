"""The bundled synthetic "shapes world": a package on top of the toolkit, never the reverse.

- :mod:`~negprompt.shapes.scene`: procedural 32×32 scenes with known attributes, and their captions;
- :mod:`~negprompt.shapes.detectors`: read every attribute back from pixels (ground truth);
- :mod:`~negprompt.shapes.model`, :mod:`~negprompt.shapes.tokenizer`: the bundled model's architecture;
- :mod:`~negprompt.shapes.training`: seeded, checkpointed, resumable training on CPU;
- :mod:`~negprompt.shapes.evaluation`, :mod:`~negprompt.shapes.methods`: the model's quality and the
  ranking of negative-prompt rules, both scored with the detectors;
- :mod:`~negprompt.shapes.regions`: the detectors as a region finder for ``negprompt edit``;
- :mod:`~negprompt.shapes.commands`: ``train``, ``evaluate``, ``bench-methods``, ``edit-sweep``.

The toolkit finds the last two through entry points (``pyproject.toml``: groups ``negprompt.commands``
and ``negprompt.region_finders``); no module outside this package imports it (``tests/test_layers.py``).
"""
