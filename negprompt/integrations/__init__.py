"""negprompt outside its own loop: its rules as diffusers guiders (:mod:`negprompt.integrations.diffusers_guiders`).

The core never imports this package (``tests/test_layers.py`` keeps layers acyclic); it imports the core's
pure formulas and windows, and diffusers' modular pipelines.
"""
