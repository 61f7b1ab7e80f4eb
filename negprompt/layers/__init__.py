"""The denoiser's attention layers: the one place that reads diffusers' ``Attention`` internals
(:mod:`~negprompt.layers.attention`) and the one way to install and restore attention processors
(:mod:`~negprompt.layers.processors`). Guidance rules that act inside attention (NAG, VSF) and the
attention capture both build on it; it imports neither."""
