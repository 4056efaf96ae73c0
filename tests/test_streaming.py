"""Streaming encode (TestStream with watermarks and late data; a live file watcher) and the drift signal."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import numpy as np
import pytest


@pytest.fixture(scope="module")
def coded_model(small_model, mnist_test, tmp_path_factory):
    """A copy of the session's small MNIST model with coder tables (so windows are also written as containers)."""
    from vaestream.coding import codec

    d = tmp_path_factory.mktemp("stream_model") / "model"
    shutil.copytree(small_model.model_dir, d)
    codec.write_tables(d, mnist_test[:1000])
    return d


# -- drift ---------------------------------------------------------------------------------------------------
def test_drift_monitor_flags_a_drop_of_the_bound_and_rebaselines(tmp_path):
    from vaestream.online.drift import DriftConfig, DriftMonitor, read_log

    mon = DriftMonitor(DriftConfig(threshold=0.1, warmup=2, rebaseline_after=3), tmp_path / "d.jsonl")
    ln2 = np.log(2)
    recs = [mon.observe(f"w{i}", elbo=np.full(50, -100.0 * ln2) + np.linspace(-1, 1, 50)) for i in range(4)]
    assert not any(r["flagged"] for r in recs)
    assert recs[0]["bits_per_record"] == pytest.approx(100.0, rel=1e-3)
    # the data change: 30 % more bits per record (the bound drops by 30 %)
    jump = [mon.observe(f"v{i}", elbo_sum=-130.0 * ln2 * 40, records=40) for i in range(4)]
    assert [r["flagged"] for r in jump] == [True, True, True, False]
    assert jump[0]["change"] == pytest.approx(0.3, rel=1e-2)
    assert jump[2]["rebaselined"] and jump[3]["reference_bits"] == pytest.approx(130.0)
    # a smaller change stays below the threshold; an empty window is reported, not judged
    assert not mon.observe("u", elbo_sum=-135.0 * ln2, records=1)["flagged"]
    assert not mon.observe("empty", elbo_sum=0.0, records=0)["flagged"]
    log = read_log(tmp_path / "d.jsonl")
    assert len(log) == 10 and [r["window"] for r in log][:2] == ["w0", "w1"]
    # the state carries over a restart
    again = DriftMonitor(mon.config, None, mon.state())
    assert again.observe("x", elbo_sum=-200.0 * ln2 * 10, records=10)["flagged"]


def test_drift_monitor_judges_the_mean_of_a_scored_sample():
    from vaestream.errors import ConfigError
    from vaestream.online.drift import DriftConfig, DriftMonitor

    ln2 = np.log(2)
    mon = DriftMonitor(DriftConfig(min_records=10))
    # 1,000 records, 125 of them scored: the mean is over the 125, bits per record coded over the 1,000
    r = mon.observe("w", elbo_sum=-100.0 * ln2 * 125, records=1000, scored=125, coded_bits=8000.0)
    assert r["records"] == 1000 and r["scored"] == 125
    assert r["bits_per_record"] == pytest.approx(100.0) and r["coded_bits_per_record"] == pytest.approx(8.0)
    assert mon.judged == 1
    few = mon.observe("few", elbo_sum=-300.0 * ln2 * 5, records=1000, scored=5)   # below min_records: not judged
    assert not few["flagged"] and mon.judged == 1
    assert np.isnan(mon.observe("none", elbo_sum=0.0, records=3, scored=0)["bits_per_record"])
    with pytest.raises(ConfigError, match="scored"):
        mon.observe("bad", elbo_sum=-1.0, records=10, scored=11)


def test_the_scored_sample_depends_on_the_key_alone_and_its_elbo_is_the_exports(coded_model, mnist_test):
    """ScoringModelHandler scores the records scored_rows picks: about 1 in 8, the same keys however the records
    are batched, each with the export's fixed-noise ELBO; every record still gets its codes."""
    from vaestream import beam as vb
    from vaestream import store
    from vaestream.beam.elements import record_key
    from vaestream.beam.scoring import ScoringModelHandler, scored_rows
    from vaestream.serving.export import elbo_fixed_noise
    from vaestream.errors import ConfigError

    x = mnist_test[:1200]
    keys = [record_key("s.npy", i) for i in range(len(x))]
    rows = scored_rows(keys, 8)
    assert 0.09 < len(rows) / len(x) < 0.16 and list(rows) == sorted(rows)
    assert list(scored_rows(keys, 1)) == list(range(len(x))) and len(scored_rows(keys, 0)) == 0
    # keys held as a name and a range (a broker message's) pick the same records as the same keys listed
    for start, stop in ((0, 1200), (7, 500), (999, 1000)):
        assert list(scored_rows(vb.KeyRange("s.npy", start, stop), 8)) == list(scored_rows(keys[start:stop], 8))
    with pytest.raises(ConfigError, match="score_every"):
        ScoringModelHandler(str(coded_model), score_every=-1)
    h = ScoringModelHandler(str(coded_model), score_every=8)
    m = h.load_model()

    def run(cuts):
        batches = [vb.RecordBatch("s.npy", keys[a:b], x[a:b], 1.0 / 255) for a, b in zip(cuts[:-1], cuts[1:])]
        out = h.run_inference(batches, m)
        scored = {k: e for s, b in zip(out, batches) for k, e in zip([b.keys[i] for i in scored_rows(b.keys, 8)],
                                                                      s.elbo)}
        return scored, np.concatenate([s.codes.mean for s in out])

    one, mean_one = run([0, 1200])
    split, mean_split = run([0, 7, 500, 501, 1200])
    assert sorted(one) == sorted(split) == [keys[i] for i in rows]
    np.testing.assert_array_equal(mean_one, mean_split)           # codes: bit-identical across batchings
    np.testing.assert_allclose([split[k] for k in sorted(one)], [one[k] for k in sorted(one)], rtol=1e-5)
    model = store.load_model(coded_model)
    # the uint8 records, made model inputs in the graph, give the batch job's codes bit for bit
    inputs = vb.RecordBatch("s.npy", keys, x, 1.0 / 255).inputs()
    np.testing.assert_array_equal(mean_one, model.encoder_params_exact(inputs)[0].numpy())
    want = elbo_fixed_noise(model, (x[rows].reshape(len(rows), -1) / np.float32(255)).astype(np.float32))["elbo"]
    np.testing.assert_allclose([one[keys[i]] for i in rows], want.numpy(), rtol=1e-4, atol=1e-3)


# -- TestStream: watermarks, late data, malformed input ------------------------------------------------------
def test_teststream_windows_late_data_and_dead_letters(coded_model, mnist_test, tmp_path):
    import apache_beam as beam
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.transforms.window import TimestampedValue

    from vaestream import beam as vb
    from vaestream import shardset
    from vaestream.beam import streaming as bs
    from vaestream.coding import codec
    from vaestream.coding import container
    from vaestream.online.registry import Registry

    src = tmp_path / "in"
    src.mkdir()
    sizes = {1: 101, 2: 102, 3: 103, 4: 104}
    for i, n in sizes.items():
        np.save(src / f"f{i}.npy", mnist_test[i * 200:i * 200 + n])
    (src / "bad.npy").write_bytes(b"junk")
    np.save(src / "nan.npy", np.full((3, 28, 28), np.nan, np.float32))
    t0 = 1_000_000  # event time, seconds; windows of 10 s: [t0, t0 + 10), [t0 + 10, t0 + 20)
    stream = (TestStream(coder=beam.coders.StrUtf8Coder())
              .add_elements([TimestampedValue(str(src / "f1.npy"), t0 + 1),
                             TimestampedValue(str(src / "bad.npy"), t0 + 2),
                             TimestampedValue(str(src / "nan.npy"), t0 + 2)])
              .advance_watermark_to(t0 + 12)        # window 1 closes: its ON_TIME pane
              .add_elements([TimestampedValue(str(src / "f2.npy"), t0 + 3),      # late, within the allowed 5 s
                             TimestampedValue(str(src / "f3.npy"), t0 + 11)])    # on time in window 2
              .advance_watermark_to(t0 + 40)        # window 1 is past its allowed lateness
              .add_elements([TimestampedValue(str(src / "f4.npy"), t0 + 4)])     # too late: dead letter
              .advance_watermark_to_infinity())
    out = tmp_path / "out"
    p = bs.streaming_pipeline()
    (p | stream | bs.StreamEncode(str(out), model_dir=str(coded_model),
                                  config=bs.StreamConfig(window=10, allowed_lateness=5, gate_step=5,
                                                         score_every=8)))
    vb.run_pipeline(p)

    wins = bs.read_windows(str(out))
    got = [(w["window_start_s"] - t0, w["timing"], w["records"], [os.path.basename(s) for s in w["sources"]])
           for w in wins]
    assert got == [(0, "on_time", 101, ["f1.npy"]), (0, "late", 102, ["f2.npy"]), (10, "on_time", 103, ["f3.npy"])]
    dead = bs.read_dead_letters(str(out))
    reasons = {os.path.basename(d["source"]): d["reason"] for d in dead}
    assert set(reasons) == {"bad.npy", "nan.npy", "f4.npy"}
    assert ": late: " in reasons["f4.npy"] and "allowed lateness 5 s" in reasons["f4.npy"]
    assert "bad.npy" in reasons["bad.npy"] and "NaN" in reasons["nan.npy"]
    assert sum(1 for d in dead if d["source"].endswith("nan.npy")) == 3  # one per malformed record
    # each pane: code Examples (TFRecord, the block layout: one a file's chunk) and a container naming the
    # model; both hold the pane's records
    c = codec.load(coded_model)
    for w in wins:
        base = out / "codes" / w["files"][0][:-len(".tfrecord")]
        tfr = str(base) + ".tfrecord"
        assert w["code_layout"] == "block/1" and shardset.count_records([tfr])[tfr] == len(w["sources"])
        assert vb.count_written([tfr], coded=True) == vb.count_written([tfr]) == w["records"]
        blob = (base.parent / (base.name + ".vaez")).read_bytes()
        head = container.read_header(__import__("io").BytesIO(blob))
        assert head.fingerprint.hex() == c.fingerprint[:2 * container.FINGERPRINT_BYTES]
        assert c.decompress(blob).shape == (w["records"], 784)
        assert w["fingerprints"] == [c.fingerprint] and w["coded_bits"] == 8 * len(blob)
    # the containers decode through a registry holding the model, by fingerprint
    reg = Registry(tmp_path / "reg")
    reg.publish(coded_model)
    x_hat = reg.decode_file(out / "codes" / wins[0]["files"][1])
    np.testing.assert_allclose(x_hat, c.decompress((out / "codes" / wins[0]["files"][1]).read_bytes()), atol=1e-5)
    # per-window drift records: mean bound and bits/record, one per pane
    drift = [json.loads(s) for s in (out / "drift.jsonl").read_text().splitlines()]
    assert len(drift) == 3 and all(d["records"] > 100 and d["bits_per_record"] > 0 for d in drift)
    assert drift[0]["mean_elbo"] == pytest.approx(wins[0]["mean_elbo"])
    # the bound is the mean over the window's scored sample (1 in 8 by key hash, StreamConfig.score_every)
    from vaestream.beam.elements import record_key
    from vaestream.beam.scoring import scored_rows

    for w, d in zip(wins, drift):
        n = sum(len(scored_rows([record_key(os.path.basename(s), i) for i in range(sizes[int(os.path.basename(s)[1])])],
                                8)) for s in w["sources"])
        assert w["scored"] == d["scored"] == n and 0 < n < w["records"] / 4


# -- a live stream: the file watcher on the in-process streaming runner, through the job shell ---------------
def test_watch_files_encodes_each_new_file_once(coded_model, mnist_test, tmp_path):
    from vaestream.beam.jobs import encode

    from vaestream.beam import streaming as bs

    src = tmp_path / "in"
    src.mkdir()
    np.save(src / "early.npy", mnist_test[:64])                 # present before the job starts

    def producer():
        time.sleep(2.0)
        for i in range(3):
            np.save(src / f".incoming-{i}.npy", mnist_test[100 * i:100 * i + 50])
            os.replace(src / f".incoming-{i}.npy", src / f"late-arrival-{i}.npy")   # atomic: the watcher sees it whole
            time.sleep(0.3)
        (src / "broken.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
        np.save(src / "note.tmp.npy", mnist_test[:5])            # temporary names are ignored

    th = threading.Thread(target=producer)
    th.start()
    out = tmp_path / "out"
    # the batch job's entry point with --streaming: an unbounded source of new files
    summary = encode.run(["--streaming", "--input", str(src / "*.npy"), "--model", str(coded_model), "--output",
                          str(out), "--window", "1", "--poll_interval", "0.5", "--idle_timeout", "4",
                          "--max-latency", "2"])
    th.join()
    wins = bs.read_windows(str(out))
    sources = [os.path.basename(s) for w in wins for s in w["sources"]]
    assert sorted(sources) == ["early.npy", "late-arrival-0.npy", "late-arrival-1.npy", "late-arrival-2.npy"]
    assert summary["records"] == 64 + 150 and summary["files_found"] == 5
    # --max-latency 2: the window (1 s) capped at 2/3 s, the poll at 2/10 s
    assert summary["max_latency_s"] == 2.0 and summary["window_s"] == pytest.approx(2 / 3)
    assert summary["poll_s"] == pytest.approx(0.2)
    assert 1 <= summary["polls_with_files"] <= 5
    assert [os.path.basename(d["source"]) for d in bs.read_dead_letters(str(out))] == ["broken.npy"]
    assert json.loads((out / "summary.json").read_text())["records"] == 214


# -- the portable source: PeriodicImpulse + match + per-path de-duplication ---------------------------------------
def test_poll_files_emits_each_file_once(tmp_path):
    """``PollFiles`` over a bounded poll span (the FnApiRunner runs it as a bounded job): a file present at
    every poll and one that appears between polls are each emitted exactly once."""
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.testing.util import assert_that, equal_to

    from vaestream.beam import streaming as bs

    (tmp_path / "a.npy").write_bytes(b"a")

    def later():
        time.sleep(0.8)
        (tmp_path / "b.npy").write_bytes(b"b")

    th = threading.Thread(target=later)
    th.start()
    now = time.time()
    with beam.Pipeline(runner=FnApiRunner()) as p:
        got = (p | bs.PollFiles(str(tmp_path / "*.npy"), interval=0.2, start=now, stop=now + 2.0)
               | beam.Map(os.path.basename))
        assert_that(got, equal_to(["a.npy", "b.npy"]))
    th.join()


# -- thousands of records: every good record coded once, late and malformed input routed, counts conserved ----
def test_thousands_of_records_each_coded_once_with_late_and_malformed_input(coded_model, mnist_test, tmp_path):
    import apache_beam as beam
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.transforms.window import TimestampedValue

    from vaestream import beam as vb
    from vaestream.beam import streaming as bs
    from vaestream.beam.elements import record_key

    src = tmp_path / "in"
    src.mkdir()
    good = {}
    for i in range(12):                                        # 12 files x 500 real MNIST test records
        p = src / f"g{i:02d}.npy"
        np.save(p, mnist_test[i * 500:(i + 1) * 500])
        good[f"g{i:02d}"] = str(p)
    mixed = mnist_test[6000:6500].astype(np.float32) / 255.0  # 490 good records, 7 NaN, 3 outside [0, 1]
    mixed[[3, 50, 77, 140, 222, 301, 499]] = np.nan
    mixed[[10, 11, 400], 5, 5] = 2.0
    np.save(src / "mixed.npy", mixed)
    (src / "junk.npy").write_bytes(b"\x93NUMPY not really")
    t0 = 2_000_000
    ev = lambda name, t: TimestampedValue(good.get(name, str(src / f"{name}.npy")), t0 + t)  # noqa: E731
    stream = (TestStream(coder=beam.coders.StrUtf8Coder())
              .add_elements([ev("g00", .5), ev("g01", .5), ev("g02", .6), ev("g03", .7), ev("mixed", 1),
                             ev("junk", 1)])
              .advance_watermark_to(t0 + 2.5)                     # window [0, 2) closes: ON_TIME pane
              .add_elements([ev("g04", 2.5), ev("g05", 2.6), ev("g06", 1.5)])   # g06: late, within the 2 s
              .advance_watermark_to(t0 + 4.5)
              .add_elements([ev("g07", 4.6), ev("g08", 4.7), ev("g09", 5.9)])
              .advance_watermark_to(t0 + 9)                       # windows [0, 2) .. [4, 6) past their lateness
              .add_elements([ev("g10", 3), ev("g11", 9.5)])       # g10: too late (dead letter); g11 on time
              .advance_watermark_to_infinity())
    out = tmp_path / "out"
    p = bs.streaming_pipeline()
    p | stream | bs.StreamEncode(str(out), model_dir=str(coded_model),
                                 config=bs.StreamConfig(window=2, allowed_lateness=2))
    vb.run_pipeline(p)

    wins = bs.read_windows(str(out))
    got = [(w["window_start_s"] - t0, w["timing"], w["records"]) for w in wins]
    assert got == [(0, "on_time", 4 * 500 + 490), (0, "late", 500), (2, "on_time", 1000), (4, "on_time", 1500),
                   (8, "on_time", 500)]
    # every good record coded exactly once: the keys in the panes' code files
    keys = [k for w in wins for b in vb.read_codes(str(out / "codes" / w["files"][0])) for k in b.keys]
    bad_rows = {3, 50, 77, 140, 222, 301, 499, 10, 11, 400}
    expected = {record_key(f"g{i:02d}.npy", j) for i in range(12) if i != 10 for j in range(500)} | \
               {record_key("mixed.npy", j) for j in range(500) if j not in bad_rows}
    assert len(keys) == len(set(keys)) == 5990 and set(keys) == expected
    # dead letters, each with its reason: the unreadable file, the 10 malformed records, the too-late file
    dead = bs.read_dead_letters(str(out))
    by_source = {}
    for d in dead:
        by_source.setdefault(os.path.basename(d["source"]), []).append(d)
    assert sorted((k, len(v)) for k, v in by_source.items()) == [("g10.npy", 1), ("junk.npy", 1), ("mixed.npy", 10)]
    late = by_source["g10.npy"][0]["reason"]
    assert ": late: " in late and "allowed lateness 2 s" in late
    assert "junk.npy" in by_source["junk.npy"][0]["reason"]
    assert sum("NaN" in d["reason"] for d in by_source["mixed.npy"]) == 7
    assert sum("outside the support" in d["reason"] for d in by_source["mixed.npy"]) == 3
    assert {d["key"] for d in by_source["mixed.npy"]} == {record_key("mixed.npy", j) for j in bad_rows}
    # counts conserved: records offered = coded + malformed + those of the late file
    assert 12 * 500 + 500 == sum(w["records"] for w in wins) + 10 + 500
    # one drift record per pane, and the containers hold every pane's records
    drift = [json.loads(s) for s in (out / "drift.jsonl").read_text().splitlines()]
    assert len(drift) == len(wins) and [d["records"] for d in drift] == [w["records"] for w in wins]
    assert all(w["coded_bits"] and len(w["files"]) == 2 for w in wins)


def test_max_latency_sizes_window_and_poll():
    import argparse

    from vaestream.beam import streaming as bs
    from vaestream.beam.jobs import stream_encode
    from vaestream.errors import ConfigError

    cfg = bs.StreamConfig(max_latency=3.0)                 # window <= L/3, poll <= L/10
    assert cfg.window == 1.0 and cfg.poll_interval(1.0) == pytest.approx(0.3) and cfg.poll_interval(0.1) == 0.1
    assert bs.StreamConfig.for_max_latency(3.0, window=1.0).window == 1.0
    assert bs.StreamConfig(window=10).poll_interval(1.0) == 1.0
    with pytest.raises(ConfigError, match="max_latency"):
        bs.StreamConfig(max_latency=0)
    ap = argparse.ArgumentParser()
    stream_encode.add_arguments(ap)
    a = ap.parse_args(["--watch", "x/*.npy", "--model", "m", "--output", "o", "--max-latency", "4"])
    assert a.max_latency == 4.0


def test_file_watcher_takes_at_most_max_batch_bytes_per_poll(tmp_path):
    from vaestream.beam.stream_sources import FileWatcher

    for i in range(5):
        (tmp_path / f"f{i}.npy").write_bytes(b"x" * 1000)
        os.utime(tmp_path / f"f{i}.npy", (1000 + i, 1000 + i))      # oldest first: f0 .. f4
    w = FileWatcher(str(tmp_path / "*.npy"), max_batch_bytes=2500)
    try:
        batches = [[os.path.basename(f) for f in w.poll()] for _ in range(4)]
    finally:
        w.close()
    assert batches == [["f0.npy", "f1.npy"], ["f2.npy", "f3.npy"], ["f4.npy"], []]


# -- the same stream from a SavedModel export (a registry version) -------------------------------------------------
def test_a_stream_from_the_saved_model_export_writes_the_model_directorys_codes(coded_model, mnist_test, tmp_path):
    """StreamEncode with ``saved_model=`` (the export's signatures, no model code) writes the same records,
    the same float codes (to float32 round-off), decodable containers and the same scored sample as with
    ``model_dir=``; a malformed file still becomes a dead letter. The export's run writes the record code
    layout (one Example a record), the directory's the default block layout: the same codes either way."""
    import apache_beam as beam
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.transforms.window import TimestampedValue

    from vaestream import beam as vb
    from vaestream import shardset
    from vaestream.beam import streaming as bs
    from vaestream.coding import codec
    from vaestream.serving.export import export

    src = tmp_path / "in"
    src.mkdir()
    np.save(src / "a.npy", mnist_test[:300])
    np.save(src / "b.npy", mnist_test[300:650])
    (src / "bad.npy").write_bytes(b"junk")
    exported = export(coded_model, tmp_path / "exports")

    def run(out, layout="block", **model):
        t0 = 3_000_000
        stream = (TestStream(coder=beam.coders.StrUtf8Coder())
                  .add_elements([TimestampedValue(str(src / n), t0 + 1) for n in ("a.npy", "b.npy", "bad.npy")])
                  .advance_watermark_to_infinity())
        p = bs.streaming_pipeline()
        p | stream | bs.StreamEncode(str(out), config=bs.StreamConfig(window=10, code_layout=layout), **model)
        vb.run_pipeline(p)
        wins = bs.read_windows(str(out))
        codes = {k: m for w in wins for b in vb.read_codes(str(out / "codes" / w["files"][0]))
                 for k, m in zip(b.keys, b.mean)}
        return wins, codes, bs.read_dead_letters(str(out))

    w1, c1, d1 = run(tmp_path / "from_dir", model_dir=str(coded_model))
    w2, c2, d2 = run(tmp_path / "from_export", "record", saved_model=str(exported))   # one Example a record
    assert [w["code_layout"] for w in w1 + w2] == ["block/1", "record/1"]
    tfr = str(tmp_path / "from_export" / "codes" / w2[0]["files"][0])
    assert shardset.count_records([tfr])[tfr] == 650
    assert sorted(c1) == sorted(c2) and len(c1) == 650
    np.testing.assert_allclose(np.stack([c2[k] for k in sorted(c1)]), np.stack([c1[k] for k in sorted(c1)]),
                               rtol=1e-5, atol=1e-6)
    assert [w["scored"] for w in w1] == [w["scored"] for w in w2] and w1[0]["mean_elbo"] == pytest.approx(
        w2[0]["mean_elbo"], rel=1e-4)
    assert [os.path.basename(d["source"]) for d in d1] == [os.path.basename(d["source"]) for d in d2] == ["bad.npy"]
    blob = (tmp_path / "from_export" / "codes" / w2[0]["files"][1]).read_bytes()
    assert codec.load(exported).decompress(blob).shape == (650, 784)
