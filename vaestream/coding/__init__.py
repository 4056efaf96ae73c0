"""Coding: records <-> bits.

* :mod:`~vaestream.coding.tables` -- the entropy model (quantised latents, integer frequency tables);
* :mod:`~vaestream.coding.range_coder` -- the range coder of the lossy path (symbols <-> payload bytes);
* :mod:`~vaestream.coding.container` -- the self-describing container (header, index, blocks);
* :mod:`~vaestream.coding.codec` -- the lossy codec: model + tables + container (``vaestream.load``);
* :mod:`~vaestream.coding.rdo` -- rate-distortion optimised quantisation (an encoder-side search; same streams);
* :mod:`~vaestream.coding.family` -- operating points over a family of models (``choose``, ``compress``);
* :mod:`~vaestream.coding.per_record` -- each record at its own operating point of a family, one stream;
* :mod:`~vaestream.coding.bitsback` -- bits-back (BB-ANS) lossless and near-lossless coding with a discrete decoder.
"""
