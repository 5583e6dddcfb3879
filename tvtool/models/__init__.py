"""open_clip adapters: build a model offline (build), zero-shot heads (heads), image-folder data
(data), the image tower as a function of its parameters (functional), applying task vectors or
coefficients in memory (weights) and evaluation (evaluate).

Import the submodules directly; this package imports nothing (so `tvtool --help` stays torch-free).
"""
