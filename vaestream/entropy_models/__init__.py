"""Learned entropy models of a conv RD model's spatial latent (``ModelConfig(entropy_model=...)``).

* :mod:`~vaestream.entropy_models.densities` -- the learned factorised density per channel (with its quantile /
  auxiliary loss) and the conditional Gaussian (likelihoods of unit intervals, rates in bits; scale indices);
* :mod:`~vaestream.entropy_models.hyperprior` -- the model's part beside the transform (gain vectors per rate
  level, hyper-analysis and -synthesis, densities) and the variable-rate training objective :func:`rd_loss`.

The exact float64 networks both coding sides run (bit-identical on any machine) are the coder's:
:mod:`vaestream.coding.exact_conv`.

The coder of such a model is :mod:`vaestream.coding.learned` (``vaestream.load`` returns it).
"""
