"""Coding: records <-> bits.

* :mod:`~vaestream.coding.coder` -- the entropy model (quantised latents, frequency tables, rANS payloads);
* :mod:`~vaestream.coding.container` -- the self-describing container (header, index, blocks);
* :mod:`~vaestream.coding.codec` -- the lossy codec: model + tables + container (``vaestream.load``);
* :mod:`~vaestream.coding.rdo` -- rate-distortion optimised quantisation (an encoder-side search; same streams);
* :mod:`~vaestream.coding.lossless` -- bits-back (BB-ANS) lossless coding with a discrete decoder.
"""
