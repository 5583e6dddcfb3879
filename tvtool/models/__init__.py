"""open_clip adapters: build a model offline (build), zero-shot heads (heads), image-folder data
(data), the image tower as a function of its parameters (functional), applying task vectors or
coefficients in memory (weights), the bank of task vectors a run learns over (bank), evaluation
(evaluate) and `tvtool eval` end to end (eval_run).

Import the submodules directly; this package imports nothing (so `tvtool --help` stays torch-free).
"""
