"""Evaluation of the coders: rate-distortion curves of a family against JPEG / WebP / AVIF / JPEG XL.

* :mod:`~vaestream.evaluation.peers` -- the peer codecs through Pillow, per image and tiled;
* :mod:`~vaestream.evaluation.rdcurve` -- ``vaestream rd FAMILY``: the family's curve (single and per-record
  points) against the peers, BD-rates, the plot.

The metrics themselves (PSNR, SSIM, envelope, BD-rate) are :mod:`vaestream.metrics`, in the core: the coders'
own choice of an operating point (:mod:`vaestream.coding.family`) measures PSNR too.
"""
