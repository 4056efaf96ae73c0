"""The online publisher's cost per version alone (no learner beside it): ``Publisher.evaluate_and_publish`` of
12 snapshots of a 784-200-10 VAE (500 held-out and 2,000 calibration Fashion-MNIST records) after ``warm``, each
published: wall and process CPU seconds, and the evaluation / coder tables / export split.

    python benchmarks/bench_publication.py
"""
import os, time, sys, tempfile, json
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from vaestream.config import ModelConfig
from vaestream.model import VAE
from vaestream.data import load_records
from vaestream.online.publisher import Publisher
from vaestream.online.registry import Registry
x = load_records("fashion-mnist", "train")[:3000].reshape(3000, -1).astype(np.float32) / 255
cfg = ModelConfig(latent_dim=10, hidden=(200,), input_dim=784, input_shape=(28, 28))
m = VAE(cfg, seed=1)
d = tempfile.mkdtemp()
logs = []
pub = Publisher(d, d, Registry(d + "/reg"), 0, 0.0, False, logs.append, lambda r: None)
w0 = [w.numpy() for w in m.weights()]
warm = pub.warm(cfg, w0, x[:2000])
rng = np.random.default_rng(0)
rows = []
for i in range(12):
    w = [a + rng.normal(0, 0.01, a.shape).astype(a.dtype) * (i + 1) for a in w0]
    snap = {"model": {"config": cfg, "weights": w}, "holdout": x[2000:2500], "calibration": x[:2000], "step": i,
            "files": i, "records_trained": i}
    pub.weights = None  # every snapshot is published (no comparison with the last version)
    t, c = time.perf_counter(), time.process_time()
    pub.evaluate_and_publish(snap)
    ev, pb = logs[-2], logs[-1]
    rows.append({"wall": time.perf_counter() - t, "cpu": time.process_time() - c, "evaluate": ev["seconds"],
                 "tables": pb["seconds_tables"], "export": pb["seconds_export"]})
med = {k: round(float(np.median([r[k] for r in rows[1:]])), 4) for k in rows[0]}
print(json.dumps({"repo": ROOT, "warm_s": round(warm, 3), "first": {k: round(v, 4) for k, v in rows[0].items()},
                  "median_of_next_11": med, "load_average": os.getloadavg()}))
