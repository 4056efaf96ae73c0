#!/usr/bin/env python3
"""Call a vaestream model behind TF Serving (or ``vaestream serve``) over its REST API.

    python deploy/client.py status   --url http://localhost:8501 --model_name vae
    python deploy/client.py metadata --url http://localhost:8501 --model_name vae
    python deploy/client.py quantize    --url URL --input t10k-images-idx3-ubyte.gz --out codes.npz
    python deploy/client.py reconstruct --url URL --input x.npy --out recon.npz
    python deploy/client.py encode | decode | elbo ...

Actions: ``quantize`` gives the integer codes (int32 [N, Nz], what vaestream's entropy coder codes),
``reconstruct`` the decoder mean at the dequantised codes, ``encode`` the posterior (mean, log_scale),
``decode`` the decoder's parameters at latents, ``elbo`` the bound in nats. Inputs are read with
vaestream's readers (IDX, .npy/.npz, CSV, ...; uint8 records are scaled by 1/255); large inputs go in
batches of ``--max-batch`` records per request (columnar ``inputs`` format). Errors from the server
(HTTP 4xx with TF Serving's ``{"error": ...}``) exit with status 1 and the message on stderr.

This is the ``vaestream client`` command; in Python use ``vaestream.serving.client.Client``::

    from vaestream.serving.client import Client
    c = Client("http://localhost:8501", "vae")
    codes = c.quantize(x)          # x: float32 [N, 784] in [0, 1]
    x_hat = c.reconstruct(x)
"""

import sys

from vaestream.cli import main

if __name__ == "__main__":
    sys.exit(main(["client", *sys.argv[1:]]))
