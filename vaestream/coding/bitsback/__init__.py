"""Bits-back (BB-ANS) lossless and near-lossless coding with a discrete decoder.

* :mod:`~vaestream.coding.bitsback.coder` -- ``LosslessCoder``: frames of records, the chain, the frame head;
* :mod:`~vaestream.coding.bitsback.tables` -- the probability models as exact integer tables;
* :mod:`~vaestream.coding.bitsback.latents` -- the latent codes: posterior windows, the scrambled prior;
* :mod:`~vaestream.coding.bitsback.chain` -- the schedule of a chain (group sizes, ramp, seed words);
* :mod:`~vaestream.coding.bitsback.context` -- pixel context models (coding with them; training is in
  :mod:`vaestream.coder_training.context`);
* :mod:`~vaestream.coding.bitsback.exact_mlp` -- ``ExactMLP``: float64 networks with exact matrix products.
"""
