"""Bits-back (BB-ANS) lossless and near-lossless coding with a discrete decoder.

* :mod:`~vaestream.coding.bitsback.codecs` -- ``Codec(push, pop)``, combinators, ``BitsBack``: where ANS is driven;
* :mod:`~vaestream.coding.bitsback.coder` -- ``LosslessCoder``: frames of records, containers, inputs;
* :mod:`~vaestream.coding.bitsback.tables` -- the probability models as exact integer tables;
* :mod:`~vaestream.coding.bitsback.latents` -- the latent codes: posterior windows, the scrambled prior;
* :mod:`~vaestream.coding.bitsback.chain` -- a frame's chain: its schedule and its one description as codecs;
* :mod:`~vaestream.coding.bitsback.context` -- pixel context models (coding with them; training is in
  :mod:`vaestream.coder_training.context`);
* :mod:`~vaestream.coding.bitsback.exact_mlp` -- ``ExactMLP``: float64 networks with exact matrix products.
"""
