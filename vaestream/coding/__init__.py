"""Coding: records <-> bits.

* :mod:`~vaestream.coding.tables` -- the entropy model (quantised latents, integer frequency tables);
* :mod:`~vaestream.coding.range_coder` -- the range coder of the lossy path (symbols <-> payload bytes);
* :mod:`~vaestream.coding.container` -- the self-describing container (header, index, blocks);
* :mod:`~vaestream.coding.codec` -- the lossy codec: model + tables + container (``vaestream.load``);
* :mod:`~vaestream.coding.learned` -- the coder of a model with a learned entropy model (``vaestream.load`` returns
  it for one): side stream, integer tables indexed by quantised scale (:mod:`~vaestream.coding.learned_tables`),
  its networks in exact float64 (:mod:`~vaestream.coding.exact_conv`);
* :mod:`~vaestream.coding.rdo` -- rate-distortion optimised quantisation (an encoder-side search; same streams);
* :mod:`~vaestream.coding.family` -- operating points over a family of models (``OperatingPoint``, ``choose``);
* :mod:`~vaestream.coding.per_record` -- each record at its own operating point of a family, one stream;
* :mod:`~vaestream.coding.bitsback` -- bits-back (BB-ANS) lossless and near-lossless coding with a discrete decoder;
* :mod:`~vaestream.coding.streams` -- one way to open a stream (``open_stream``): the coder that decodes it.

``vaestream.coding.open_stream`` imports :mod:`~vaestream.coding.streams` on first use.
"""

import importlib as _importlib

_LAZY = {"open_stream": "vaestream.coding.streams", "bitsback_coder": "vaestream.coding.family"}


def __getattr__(name: str):
    """The lazily imported names (:data:`_LAZY`)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value
