"""Streaming from a real broker (a redis-server each test module starts on a free 127.0.0.1 port, with its data in
a temporary directory): the wire format, the reader and ledger, the stream encoder fed by the broker (exactly
once through crashes at each commit point and a broker restart), the splittable-DoFn form on the FnApiRunner,
the online learner following a stream."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vaestream.broker.server import server_path

redis = pytest.importorskip("redis", reason="the redis client is not installed (pip install redis)")
pytestmark = pytest.mark.skipif(server_path() is None,
                                reason="redis-server is not installed (apt-get install redis-server)")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from vaestream.broker.server import RedisServer

    with RedisServer(tmp_path_factory.mktemp("redis")) as srv:
        yield srv


@pytest.fixture(scope="module")
def coded_model(small_model, mnist_test, tmp_path_factory):
    """A copy of the session's small MNIST model with coder tables."""
    from vaestream.coding import codec

    d = tmp_path_factory.mktemp("broker_model") / "model"
    shutil.copytree(small_model.model_dir, d)
    codec.write_tables(d, mnist_test[:1000])
    return d


def _stream(request) -> str:
    return request.node.name.replace("[", "-").replace("]", "")


def _keys_of(out: Path) -> list[str]:
    from vaestream import beam as vb
    from vaestream.beam import streaming as bs

    return [k for w in bs.read_windows(str(out)) for b in vb.read_codes(str(out / "codes" / w["files"][0]))
            for k in b.keys]


def _expected_keys(ids: list[str], n: int, bad: dict[str, set[int]] | None = None) -> set[str]:
    from vaestream.broker.wire import record_key

    bad = bad or {}
    return {record_key(i, j) for i in ids for j in range(n) if j not in bad.get(i, set())}


def _pending(url: str, group: str) -> int:
    from vaestream.broker import BrokerURL

    u = BrokerURL.parse(url)
    c = u.client()
    try:
        return int(c.xpending(u.stream, group)["pending"])
    finally:
        c.close()


# -- wire format, reader, ledger ------------------------------------------------------------------------------
def test_wire_format_round_trips_and_names_malformed_messages(server, mnist_test, request):
    from vaestream.broker import BrokerReader, WireError, decode, encode, publish

    stream = _stream(request)
    url = server.url(stream)
    x = mnist_test[:250]
    res = publish(url, x, records_per_message=100)
    assert (res["messages"], res["records"]) == (3, 250)
    publish(url, x[:3].astype(np.float32) / 255, 100, fmt="npy", event_time=1_700_000_000.25)
    c = server_client(server)
    c.xadd(stream, encode(x[7], batch=False))                      # one record
    c.xadd(stream, {"vaestream": "1", "format": "raw", "data": b"\0" * 10, "dtype": "|u1", "shape": "1,28,28"})
    c.xadd(stream, {"vaestream": "1", "format": "npy", "data": b"\x93NUMPY junk"})
    c.xadd(stream, {"hello": "world"})
    msgs = BrokerReader(url, "g").setup().read(count=100)
    assert len(msgs) == 8
    got = [decode(m) for m in msgs[:5]]
    assert [g.shape for g in got] == [(100, 28, 28), (100, 28, 28), (50, 28, 28), (3, 28, 28), (1, 28, 28)]
    np.testing.assert_array_equal(np.concatenate(got[:3]), x)
    np.testing.assert_array_equal(got[3], x[:3].astype(np.float32) / 255)
    np.testing.assert_array_equal(got[4][0], x[7])
    assert msgs[3].event_time == 1_700_000_000.25
    assert abs(msgs[0].event_time - time.time()) < 60                        # the broker's time
    reasons = []
    for m in msgs[5:]:
        with pytest.raises(WireError) as e:
            decode(m)
        reasons.append(str(e.value))
    assert "10 bytes of data" in reasons[0] and "needs 784" in reasons[0] and msgs[5].ref in reasons[0]
    assert ".npy payload does not parse" in reasons[1]
    assert "no 'vaestream' field" in reasons[2]


def server_client(server):
    return redis.Redis(host="127.0.0.1", port=server.port)


def test_reader_redelivers_unacknowledged_poisons_after_max_deliver_and_fails_clearly(server, request, tmp_path):
    from vaestream.broker import BrokerError, BrokerReader, publish
    from vaestream.broker.server import RedisServer

    url = server.url(_stream(request))
    ids = [publish(url, np.zeros((2, 4), np.uint8))["first_id"] for _ in range(3)]
    first = BrokerReader(url, "g", max_deliver=2).setup().read()       # delivered once, never acknowledged
    assert [m.id for m in first] == ids and all(m.delivered == 1 for m in first)
    again = BrokerReader(url, "g", max_deliver=2, committed=[ids[0]]).setup()   # a restart: ids[0] committed
    second = again.read()
    assert [(m.id, m.delivered) for m in second] == [(ids[1], 2), (ids[2], 2)]
    assert again.counts["skipped_committed"] == 0 and _pending(url, "g") == 2   # ids[0] acked at set-up
    again.ack([ids[1]])
    third = BrokerReader(url, "g", max_deliver=2)
    assert third.read() == [] and [m.id for m, _ in third.poisoned] == [ids[2]]
    assert "delivered 3 times (max_deliver 2)" in third.poisoned[0][1]
    # a consumer that died holding messages: another consumer of the group reclaims them after ack_wait
    more = [publish(url, np.zeros((2, 4), np.uint8))["first_id"] for _ in range(2)]
    assert [m.id for m in BrokerReader(url, "g2", consumer="dies", start_id="$").setup().read()] == []
    more += [publish(url, np.zeros((2, 4), np.uint8))["first_id"] for _ in range(2)]
    assert [m.id for m in BrokerReader(url, "g2", consumer="dies").read()] == more[2:]
    other = BrokerReader(url, "g2", consumer="lives", ack_wait=0.2)
    assert other.read(block=0) == []                          # nothing new, and not idle for long enough yet
    time.sleep(0.3)
    got = other.read()
    assert [(m.id, m.delivered) for m in got] == [(i, 2) for i in more[2:]] and other.read(block=0) == []
    # a broker that is gone: the reader retries, then says so
    dead = RedisServer(tmp_path / "gone")
    with pytest.raises(BrokerError, match=r"redis://127.0.0.1:\d+/s: XGROUP CREATE: broker unreachable for 1 s"):
        BrokerReader(dead.url("s"), reconnect_timeout=1.0).setup()


def test_trimming_keeps_every_entry_a_group_still_needs(server, mnist_test, request):
    """XTRIM MINID ~ below the minimum over ALL the stream's groups of the oldest pending entry (or the one after
    the last delivered): a group that has read nothing keeps the whole stream; trim=0 turns trimming off."""
    from vaestream.broker import BrokerReader, publish
    from vaestream.errors import ConfigError

    stream = _stream(request)
    url = server.url(stream)
    c = server_client(server)
    c.xgroup_create(stream, "other", "0", mkstream=True)            # a group that has read nothing yet
    ids = [publish(url, mnist_test[i * 100:(i + 1) * 100])["first_id"] for i in range(12)]
    a = BrokerReader(url, "a").setup()
    a.ack([m.id for m in a.read(count=100)])                         # group a: all read and acknowledged
    assert a.trim() == 0 and c.xlen(stream) == 12
    b = BrokerReader(url, "other").setup()
    assert [m.id for m in b.read(count=8)] == ids[:8]
    b.ack(ids[:5])                                                   # pending ids[5:8], ids[8:] not delivered
    assert a.trim() == 5 and [e[0].decode() for e in c.xrange(stream)] == ids[5:]   # 78 kB entries: one a node
    b.ack(ids[5:8])
    assert a.trim() == 3 and [e[0].decode() for e in c.xrange(stream)] == ids[8:]   # after b's last delivered
    more = [publish(url, mnist_test[:100])["first_id"] for _ in range(2)]
    off = BrokerReader(url + "?trim=0", "other").setup()
    got = off.read(count=100)
    off.ack([m.id for m in got])
    off.close()                                                      # trim=0: nothing trimmed, even at close
    assert [m.id for m in got] == ids[8:] + more and off.counts["trimmed"] == 0 and c.xlen(stream) == 6
    a.ack([m.id for m in a.read(count=100)])
    a.close()                                                        # both groups done: trimmed at close
    assert c.xlen(stream) == 0 and a.counts["trimmed"] == 14
    with pytest.raises(ConfigError, match="trim must be 0 or 1"):
        BrokerReader(url + "?trim=yes")


def test_ledger_rolls_committed_units_forward_and_drops_uncommitted(tmp_path):
    from vaestream.broker import Ledger

    led = Ledger(tmp_path)
    a, b, c = tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "c.bin"
    for f in (a, b, c):
        led.write_staged(f, f.name.encode())
    # a crash inside a commit: the entry is written, the renames are not
    led.dir.mkdir()
    (led.dir / "u1.json").write_text(json.dumps({"name": "u1", "ids": ["5-0", "6-0"], "files": ["a.bin", "b.bin"]}))
    assert led.recover() == {"entries": 1, "rolled_forward": 2, "removed_uncommitted": 1}
    assert a.read_bytes() == b"a.bin" and b.exists() and not c.exists() and not Path(led.staged(c)).exists()
    assert led.committed_ids() == {"5-0", "6-0"}
    led.write_staged(c, b"c")
    led.commit("u2", [c], ["7-0"], records=1)
    assert c.read_bytes() == b"c" and led.committed_ids() == {"5-0", "6-0", "7-0"}


# -- the stream encoder on the broker -------------------------------------------------------------------------
def test_stream_encode_from_the_broker_codes_every_good_record_once(server, coded_model, mnist_test, request,
                                                                     tmp_path):
    from vaestream.beam import streaming as bs
    from vaestream.broker import Ledger, encode, publish
    from vaestream.broker.wire import record_key

    url = server.url(_stream(request))
    c = server_client(server)
    stream = _stream(request)
    out = tmp_path / "out"
    good_ids, bad_rows = [], {}
    late_ids, junk_ids = [], []

    def produce():
        for i in range(20):                                   # 2,000 real MNIST test records, 100 per message
            good_ids.append(publish(url, mnist_test[i * 100:(i + 1) * 100])["first_id"])
        mixed = mnist_test[2000:2100].astype(np.float32) / 255.0
        mixed[[3, 50]] = np.nan
        mixed[77, 5, 5] = 2.0
        mid = c.xadd(stream, encode(mixed)).decode()
        good_ids.append(mid)
        bad_rows[mid] = {3, 50, 77}
        junk_ids.append(c.xadd(stream, {"vaestream": "1", "format": "raw", "data": b"x", "dtype": "|u1",
                                        "shape": "1,28,28"}).decode())
        junk_ids.append(c.xadd(stream, {"not": "ours"}).decode())
        # once a pane is committed and the watermark has moved on: late messages and more good ones
        deadline = time.monotonic() + 60
        while not (out / "ledger").is_dir() or not os.listdir(out / "ledger"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(2.0)
        for j in range(2):
            late_ids.append(c.xadd(stream, encode(mnist_test[3000 + j * 100:3100 + j * 100],
                                                  event_time=time.time() - 600)).decode())
        for i in range(21, 41):                               # 2,000 more
            good_ids.append(publish(url, mnist_test[i * 100:(i + 1) * 100])["first_id"])
        while True:                                           # then stop once all are delivered and acknowledged
            g = [g for g in c.xinfo_groups(stream) if g["name"] == b"stream-encode"][0]
            if g["pending"] == 0 and g["lag"] == 0:
                break
            assert time.monotonic() < deadline + 60
            time.sleep(0.1)
        stop.set()

    stop = threading.Event()
    t = threading.Thread(target=produce)
    t.start()
    res = bs.run_stream(str(out), model_dir=str(coded_model), config=bs.StreamConfig(window=1.0), source=url,
                        idle_timeout=60.0, stop=stop)
    t.join()
    keys = _keys_of(out)
    expected = _expected_keys(good_ids, 100, bad_rows)
    assert len(keys) == len(set(keys)) == 4097 and set(keys) == expected
    dead = bs.read_dead_letters(str(out))
    by = {}
    for d in dead:
        by.setdefault(d["source"].split("/")[-1], []).append(d)
    (mixed_id,) = bad_rows
    assert sorted(by) == sorted(late_ids + junk_ids + [mixed_id])
    assert all(": late: " in by[i][0]["reason"] and "before the message arrived" in by[i][0]["reason"]
               for i in late_ids)
    assert "1 bytes of data" in by[junk_ids[0]][0]["reason"] and "no 'vaestream' field" in by[junk_ids[1]][0]["reason"]
    mixed = by[mixed_id]
    assert {d["key"] for d in mixed} == {record_key(mixed_id, j) for j in (3, 50, 77)}
    assert sum("NaN" in d["reason"] for d in mixed) == 2 and sum("outside the support" in d["reason"]
                                                                 for d in mixed) == 1
    # an ack_wait a pane's messages could outlive is refused
    from vaestream.errors import ConfigError

    with pytest.raises(ConfigError, match="ack_wait 1.5 s must exceed the window plus the allowed lateness"):
        bs.run_stream(str(tmp_path / "x"), model_dir=str(coded_model), config=bs.StreamConfig(window=1.0,
                      allowed_lateness=1.0), source=url + "?ack_wait=1.5")
    # counts conserved: records published = coded + refused records + late messages' records (+ 2 junk messages)
    assert 4100 + 200 == len(keys) + 3 + 200 and len(dead) == 3 + 2 + 2
    # every message committed once in the ledger, and acknowledged
    led = Ledger(out).entries()
    ids = [i for e in led for i in e["ids"]]
    assert len(ids) == len(set(ids)) and set(ids) == set(good_ids + late_ids + junk_ids)
    assert _pending(url, "stream-encode") == 0 and res["backlog"]["pending"] == 0
    assert res["records"] == 4097 and res["messages_read"] == 45 and res["code_layout"] == "block/1"
    assert res["elements"] < res["messages_read"]          # a read's messages of one window are one element
    assert not list(out.rglob("*.pending"))
    # each pane's one container holds its records' quantised means, in the order of its Examples
    from vaestream import beam as vb
    from vaestream import shardset
    from vaestream.coding import codec
    from vaestream.coding.tables import quantize

    cod = codec.load(coded_model)
    blocks = 0
    for w in bs.read_windows(str(out)):
        # the block layout: one Example a message of good records (its keys as the message ID and offset 0, or
        # listed where records of it were refused), as many records as the pane
        assert w["files"][1].endswith(".vaez") and w["code_layout"] == "block/1"
        tfr = str(out / "codes" / w["files"][0])
        blocks += shardset.count_records([tfr])[tfr]
        assert vb.count_written([tfr], coded=True) == w["records"]
        mean = np.concatenate([b.mean for b in vb.read_codes(str(out / "codes" / w["files"][0]))])
        symbols, _ = cod.decompress_codes((out / "codes" / w["files"][1]).read_bytes())
        np.testing.assert_array_equal(symbols, quantize(mean, cod.tables, cod.quality))
        assert w["coded_bits"] == 8 * (out / "codes" / w["files"][1]).stat().st_size
    assert blocks == len(good_ids)
    # the only group has acknowledged everything: the stream is trimmed to nothing
    assert c.xlen(stream) == 0 and res["broker"]["trimmed"] == 45


DRIVER = """
import json, sys
from vaestream.beam import streaming as bs
out, model, url = sys.argv[1:4]
print(json.dumps(bs.run_stream(out, model_dir=model, config=bs.StreamConfig(window=1.0), source=url,
                               idle_timeout=1.5)))
"""


def _run_driver(out, model, url, fault=None, at=2):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    env.pop("VAESTREAM_FAULT", None)
    if fault:
        env.update(VAESTREAM_FAULT=fault, VAESTREAM_FAULT_AT=str(at))
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(out), str(model), url], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_at_each_commit_point_and_restarted_writes_every_record_once(server, coded_model, mnist_test,
                                                                            request, tmp_path):
    """The job dies (os._exit) at its second pane's commit point: before the rename, after the rename and before
    the acknowledgement, after the acknowledgement; the restarted job's output holds every record once."""
    from vaestream.beam import streaming as bs
    from vaestream.broker import Ledger, encode, publish

    t0 = time.time() - 30
    cases = {}
    for point in ("before_rename", "after_rename", "after_ack"):
        url = server.url(f"{_stream(request)}-{point}")
        c = server_client(server)
        ids = []
        for i in range(12):   # three windows of event time (1 s each), four messages of 100 records in each
            ids.append(c.xadd(f"{_stream(request)}-{point}",
                              encode(mnist_test[i * 100:(i + 1) * 100], event_time=t0 + i % 3 + 0.5)).decode())
        junk = c.xadd(f"{_stream(request)}-{point}", {"vaestream": "1", "format": "zip", "data": b""}).decode()
        cases[point] = (url, ids, junk, tmp_path / point, _run_driver(tmp_path / point, coded_model, url, point))
    for point, (url, ids, junk, out, proc) in cases.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 86, (point, err[-2000:])
        committed = Ledger(out).entries()
        assert len(committed) == (1 if point == "before_rename" else 2), point
        assert bool(list(out.rglob("*.pending"))) == (point == "before_rename")
        assert _pending(url, "stream-encode") > 0
    for point, (url, ids, junk, out, _) in cases.items():
        res = bs.run_stream(str(out), model_dir=str(coded_model), config=bs.StreamConfig(window=1.0), source=url,
                            idle_timeout=1.5)
        keys = _keys_of(out)
        assert len(keys) == len(set(keys)) == 1200 and set(keys) == _expected_keys(ids, 100), point
        dead = bs.read_dead_letters(str(out))
        assert [d["source"] for d in dead] == [f"{_stream(request)}-{point}/{junk}"], point
        assert "format 'zip'" in dead[0]["reason"]
        ledger_ids = [i for e in Ledger(out).entries() for i in e["ids"]]
        assert sorted(ledger_ids) == sorted(ids + [junk]), point
        assert _pending(url, "stream-encode") == 0 and not list(out.rglob("*.pending"))
        if point == "before_rename":
            assert res["recovered"]["removed_uncommitted"] > 0
        if point == "after_rename":
            assert res["broker"]["skipped_committed"] == 0   # acknowledged at start-up from the ledger
    # a message that keeps failing is dead-lettered after max_deliver deliveries
    url = server.url(f"{_stream(request)}-poison", max_deliver="1")
    mid = publish(url, mnist_test[:100])["first_id"]
    from vaestream.broker import BrokerReader

    BrokerReader(url, "stream-encode").setup().read()     # a delivery whose job died before committing anything
    out = tmp_path / "poison"
    res = bs.run_stream(str(out), model_dir=str(coded_model), config=bs.StreamConfig(window=1.0), source=url,
                        idle_timeout=1.0)
    dead = bs.read_dead_letters(str(out))
    assert res["poisoned"] == 1 and res["records"] == 0 and len(dead) == 1
    assert dead[0]["key"].endswith(mid) and "delivered 2 times (max_deliver 1)" in dead[0]["reason"]
    assert _pending(url, "stream-encode") == 0


def test_a_restart_behind_a_backlog_codes_it_all(server, coded_model, mnist_test, request, tmp_path):
    """Entries pending from before a restart are read first; a short read of them is not 'caught up': the
    backlog published while the job was down stays on time (not dead-lettered as late)."""
    from vaestream.beam import streaming as bs
    from vaestream.broker import BrokerReader, publish

    url = server.url(_stream(request))
    ids = [publish(url, mnist_test[:100])["first_id"]]
    BrokerReader(url, "stream-encode").setup().read()      # delivered to the job that then died
    time.sleep(1.2)                                          # later windows
    ids += [publish(url, mnist_test[i * 100:(i + 1) * 100])["first_id"] for i in range(1, 13)]
    res = bs.run_stream(str(tmp_path / "out"), model_dir=str(coded_model), config=bs.StreamConfig(window=0.5),
                        source=url, idle_timeout=1.0, batch_messages=4)
    assert res["dead_lettered"] == 0 and res["broker"]["redelivered"] == 1
    assert set(_keys_of(tmp_path / "out")) == _expected_keys(ids, 100)


def test_broker_restarted_under_the_job_resumes(coded_model, mnist_test, tmp_path):
    from vaestream.beam import streaming as bs
    from vaestream.broker import publish
    from vaestream.broker.server import RedisServer

    srv = RedisServer(tmp_path / "redis").start()
    try:
        url = srv.url("restart")
        out = tmp_path / "out"
        ids = [publish(url, mnist_test[i * 100:(i + 1) * 100])["first_id"] for i in range(10)]
        box = {}
        job = threading.Thread(target=lambda: box.update(res=bs.run_stream(
            str(out), model_dir=str(coded_model), config=bs.StreamConfig(window=0.5), source=url, idle_timeout=3.0)))
        job.start()
        deadline = time.monotonic() + 60
        while not (out / "ledger").is_dir() or not os.listdir(out / "ledger"):
            assert time.monotonic() < deadline and job.is_alive()
            time.sleep(0.05)
        srv.restart(down=1.0)                               # the stream and the group come back from the AOF
        ids += [publish(url, mnist_test[i * 100:(i + 1) * 100])["first_id"] for i in range(10, 20)]
        job.join(120)
        keys = _keys_of(out)
        assert len(keys) == len(set(keys)) == 2000 and set(keys) == _expected_keys(ids, 100)
        assert box["res"]["backlog"]["pending"] == 0
        # the broker gone for good: the job commits what it holds, then fails naming the broker
        from vaestream.broker import BrokerError, Ledger

        out2 = tmp_path / "out2"
        for i in range(10):                                 # a stream of its own (the first was trimmed: read)
            publish(srv.url("restart2"), mnist_test[i * 100:(i + 1) * 100])
        gone = threading.Thread(target=lambda: (_wait_for_ledger(out2), srv.stop()))
        gone.start()
        with pytest.raises(BrokerError, match=r"redis://127.0.0.1:\d+/restart2: \w+: broker unreachable for 2 s"):
            bs.run_stream(str(out2), model_dir=str(coded_model), config=bs.StreamConfig(window=0.5),
                          source=srv.url("restart2", group="g2", reconnect_timeout="2"), idle_timeout=30.0)
        gone.join()
        assert Ledger(out2).entries() and not list(out2.rglob("*.pending"))
    finally:
        srv.stop()


def _wait_for_ledger(out: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not (out / "ledger").is_dir() or not os.listdir(out / "ledger"):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_splittable_read_on_the_fnapi_runner_bounded(server, coded_model, mnist_test, request, tmp_path):
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from vaestream.beam import streaming as bs
    from vaestream.beam.broker_source import BrokerCommit
    from vaestream.beam.broker_splittable import ReadBroker
    from vaestream.broker import Ledger, publish

    url = server.url(_stream(request))
    ids = [publish(url, mnist_test[i * 100:(i + 1) * 100])["first_id"] for i in range(8)]
    out = tmp_path / "out"

    def run(**kw) -> int:
        from apache_beam.metrics.metric import MetricsFilter

        p = beam.Pipeline(runner=FnApiRunner())
        (p | beam.Create([url]) | ReadBroker("sdf", committed_from=str(out), **kw)
         | bs.StreamEncode(str(out), model_dir=str(coded_model), config=bs.StreamConfig(window=1.0),
                           broker=BrokerCommit(url, "sdf", str(out))))
        result = p.run()
        result.wait_until_finish()
        got = result.metrics().query(MetricsFilter().with_name("broker_checkpoints"))["counters"]
        return sum(c.committed for c in got)

    assert run(max_messages=5) == 0                       # bounded by a count
    assert set(_keys_of(out)) == _expected_keys(ids[:5], 100) and _pending(url, "sdf") == 0
    assert run(idle_timeout=1.0) >= 2                     # bounded by idleness: checkpoints until then
    keys = _keys_of(out)
    assert len(keys) == len(set(keys)) == 800 and set(keys) == _expected_keys(ids, 100)
    assert sorted(i for e in Ledger(out).entries() for i in e["ids"]) == sorted(ids)
    assert _pending(url, "sdf") == 0


# -- the online learner -----------------------------------------------------------------------------------------
def test_online_learner_follows_the_broker_and_publishes_a_version(server, mnist_train, mnist_test, request,
                                                                   tmp_path):
    from vaestream.broker import encode, publish
    from vaestream.config import ModelConfig
    from vaestream.online import OnlineConfig, OnlineLearner
    from vaestream.online.registry import Registry

    url = server.url(_stream(request))
    ids = [publish(url, mnist_train[i * 500:(i + 1) * 500], records_per_message=500)["first_id"] for i in range(6)]
    bad = server_client(server).xadd(_stream(request), encode(np.full((5, 3), 0.5, np.float32))).decode()
    kw = dict(registry=tmp_path / "reg", model_config=ModelConfig(latent_dim=5, hidden=(64,)),
              online_config=OnlineConfig(batch_size=100, buffer_size=2000, holdout_size=500, background_publish=False,
                                         checkpoint_every_files=100),
              holdout=mnist_test[:500])
    learner = OnlineLearner(tmp_path / "work", **kw)
    res = learner.follow_source(url, batch_messages=3, max_messages=4)
    assert res["messages"] == 4 and res["records_trained"] == 2000
    assert res["published"]["version"] >= 1 and 1 in Registry(tmp_path / "reg").index()
    # following again (a new reader, started from the ledger): nothing twice, the rest once, the bad message
    # rejected (a new learner on the work directory resumes from the same ledger: tests/test_online.py)
    res = learner.follow_source(url, batch_messages=3, idle_timeout=1.0)
    assert res["records_trained"] == 3000 and res["broker"]["redelivered"] == 0
    led = json.loads((tmp_path / "work" / "ledger.json").read_text())
    assert sorted(i for f in led["files"] for i in f["ids"]) == sorted(ids)
    assert [r["ids"] for r in led["rejected"]] == [[bad]] and "784" in led["rejected"][0]["reason"]
    assert _pending(url, "follow") == 0


def test_pubsub_shaped_messages_through_a_teststream_are_written_once(coded_model, mnist_test, tmp_path):
    """The wiring of Dataflow/Flink sources (ReadFromPubSub / ReadFromKafka -> message_from_bytes ->
    StreamEncode with a ledger-only BrokerCommit), driven by a TestStream: windows, a malformed and a late
    message; the same stream delivered again (a restarted runner) adds nothing."""
    import apache_beam as beam
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.transforms.window import TimestampedValue

    from vaestream import beam as vb
    from vaestream.beam import streaming as bs
    from vaestream.beam.broker_source import BrokerCommit, message_from_bytes
    from vaestream.broker import Ledger, encode

    t0 = 3_000_000

    def msg(i, t, fields=None):
        f = {k: v for k, v in (fields or encode(mnist_test[i * 100:(i + 1) * 100])).items()}
        data = f.pop("data")
        return TimestampedValue((data, {k: v.decode() if isinstance(v, bytes) else v for k, v in f.items()},
                                 str(1000 + i), t0 + t), t0 + t)

    out = tmp_path / "out"
    for _ in range(2):
        stream = (TestStream(coder=beam.coders.PickleCoder())
                  .add_elements([msg(0, .5), msg(1, .7), msg(2, 1.5), msg(3, 1.9, {"data": b"", "vaestream": "1"})])
                  .advance_watermark_to(t0 + 2.5)
                  .add_elements([msg(4, 2.5), msg(5, 3.0)])
                  .advance_watermark_to(t0 + 9)
                  .add_elements([msg(6, 1.0)])                       # its window closed 7 s ago: late
                  .advance_watermark_to_infinity())
        p = bs.streaming_pipeline()
        (p | stream | beam.Map(lambda e: message_from_bytes(e[0], e[1], e[2], "projects/p/subscriptions/s", e[3]))
         | bs.StreamEncode(str(out), model_dir=str(coded_model), config=bs.StreamConfig(window=2),
                           broker=BrokerCommit(None, None, str(out))))
        vb.run_pipeline(p)
        wins = bs.read_windows(str(out))
        assert [(w["window_start_s"] - t0, w["records"]) for w in wins] == [(0, 300), (2, 200)]
        keys = _keys_of(out)
        assert len(keys) == len(set(keys)) == 500 and set(keys) == _expected_keys(["1000", "1001", "1002", "1004",
                                                                                   "1005"], 100)
        dead = sorted(bs.read_dead_letters(str(out)), key=lambda d: d["source"])
        assert [d["source"] for d in dead] == ["projects/p/subscriptions/s/1003", "projects/p/subscriptions/s/1006"]
        assert "no 'format' field" in dead[0]["reason"] and ": late: " in dead[1]["reason"]
        assert sorted(i for e in Ledger(out).entries() for i in e["ids"]) == [str(1000 + i) for i in range(7)]


# -- the command line -------------------------------------------------------------------------------------------
def _cli(*args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "vaestream.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_cli_publish_then_stream_encode_and_follow_read_the_stream(server, coded_model, mnist_test, request,
                                                                   tmp_path):
    from vaestream.broker.wire import record_key

    url = server.url(_stream(request))
    np.save(tmp_path / "x.npy", mnist_test[:1000])
    pub = _cli("publish", "--to", url, "--input", str(tmp_path / "x.npy"), "--records-per-message", "250")
    out, err = pub.communicate(timeout=120)
    assert pub.returncode == 0, err
    summary = json.loads(out)
    assert (summary["messages"], summary["records"]) == (4, 1000)
    c = server_client(server)
    ids = [e[0].decode() for e in c.xrange(_stream(request))]
    c.xgroup_create(_stream(request), "follow", "0")          # the learner's group exists before the encoder runs
    enc = _cli("stream-encode", "--source", url, "--model", str(coded_model), "--output", str(tmp_path / "codes"),
               "--window", "1", "--idle_timeout", "2", "--json")
    e_out, e_err = enc.communicate(timeout=300)
    assert enc.returncode == 0, e_err[-3000:]
    res = json.loads(e_out.strip().splitlines()[-1])
    assert res["records"] == 1000 and res["messages_read"] == 4 and res["backlog"]["pending"] == 0
    assert set(_keys_of(tmp_path / "codes")) == {record_key(i, j) for i in ids for j in range(250)}
    assert c.xlen(_stream(request)) == 4                     # all acknowledged by stream-encode, none read by follow
    fol = _cli("follow", "--source", url, "--work", str(tmp_path / "work"), "--latent-dim", "3", "--hidden", "32",
               "--idle-timeout", "2", "--json")
    f_out, f_err = fol.communicate(timeout=300)
    assert fol.returncode == 0, f_err[-3000:]
    follow = json.loads(f_out.strip().splitlines()[-1])
    assert follow["messages"] == 4 and follow["records_trained"] > 0 and _pending(url, "follow") == 0
    assert c.xlen(_stream(request)) == 0                     # both groups done: the last to finish trimmed it
    # a bad URL: one line, exit 1
    bad = _cli("publish", "--to", "http://127.0.0.1/x", "--input", str(tmp_path / "x.npy"))
    out, err = bad.communicate(timeout=120)
    assert bad.returncode == 1 and err.strip().splitlines() == [
        "vaestream: error: http://127.0.0.1/x: a broker URL is redis://HOST:PORT/STREAM (scheme http)"]
