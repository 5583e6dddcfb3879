"""aTLAS: learn anisotropic, block-wise coefficients for a bank of task vectors.

coefs (the learnable Lambda over a `tvtool.models.bank` plan, and the composition
theta = theta_0 + sum_t Lambda[t, g] * tau_t), objectives (ce, entropy, pseudo; negation roles),
sampling (seeded, rank-sharded batches), train (the loop, checkpoints, resume), ddp (torchrun
support), select (grad / importance / norm scores), and the two orchestrators compose_run
(`tvtool compose` end to end) and select_run (`tvtool select` end to end).

Import the submodules directly; this package imports nothing.
"""
