"""Training the bits-back coder's own models against a trained member (AEVB training is :mod:`vaestream.training`).

* :mod:`~vaestream.coder_training.context` -- pixel context models and their reconstruction networks
  (``vaestream train-context``);
* :mod:`~vaestream.coder_training.joint` -- a member fine-tuned together with its context model
  (``vaestream train-joint``).

A layer above :mod:`vaestream.coding` (it codes with ``LosslessCoder`` to train), below the CLI.
"""
