"""aTLAS: learn anisotropic, block-wise coefficients for a bank of task vectors.

bank (vectors checked against the model, loaded to the device), coefs (the learnable Lambda and
the composition theta = theta_0 + sum_t Lambda[t, g] * tau_t), objectives (ce, entropy, pseudo;
negation roles), sampling (seeded, rank-sharded batches), train (the loop, checkpoints, resume),
ddp (torchrun support), runner (compose end to end), select (grad / importance / norm scores).

Import the submodules directly; this package imports nothing.
"""
