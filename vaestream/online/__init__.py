"""Online learning: learn from files as they arrive, keep versions, watch for drift.

* :mod:`~vaestream.online.learner` -- ``OnlineLearner`` and ``OnlineConfig``;
* :mod:`~vaestream.online.following` -- following a file pattern or a broker stream (``OnlineLearner.follow``,
  ``follow_source``);
* :mod:`~vaestream.online.pipeline` -- a file planned, computed, started and finished; a checkpoint captured and
  committed; ``OnlineLearner.process_files``;
* :mod:`~vaestream.online.checkpoints` -- ``CachedCheckpoints``: training checkpoints by a cached ``SaveV2``;
* :mod:`~vaestream.online.replay` -- ``ReplayBuffer``;
* :mod:`~vaestream.online.registry` -- ``Registry``: model versions for streaming jobs;
* :mod:`~vaestream.online.drift` -- ``DriftMonitor``: the ELBO-based drift statistic.

``vaestream.online.OnlineLearner`` (and the other names the old ``vaestream/online.py`` had) stay importable
from here.
"""

from vaestream.online.learner import DEAD_LETTER, DRIFT_LOG, LEDGER, LOG, MODEL, OnlineConfig, OnlineLearner
from vaestream.online.replay import ReplayBuffer

__all__ = ["OnlineConfig", "OnlineLearner", "ReplayBuffer", "LEDGER", "LOG", "DRIFT_LOG", "DEAD_LETTER", "MODEL"]
