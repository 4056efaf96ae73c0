"""TFRecord code files read in the calling thread (``readers.tfrecord_file_chunks``): the records and chunks that
``tf.data`` gives, and on a corrupt or truncated file the whole records before the damage and the error."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from vaestream.beam.readers import tfrecord_chunks, tfrecord_file_chunks
from vaestream.errors import DataError


def _write(path, records):
    with tf.io.TFRecordWriter(str(path)) as w:
        for r in records:
            w.write(r)


def test_file_chunks_are_tf_datas_and_damage_keeps_the_records_before(tmp_path):
    rng = np.random.default_rng(0)
    records = [rng.integers(0, 256, int(rng.integers(100, 3000)), np.uint8).tobytes() for _ in range(23)]
    path = tmp_path / "r.tfrecord"
    _write(path, records)
    for chunk in (1, 5, 23, 100):
        got = list(tfrecord_file_chunks(str(path), chunk))
        want = list(tfrecord_chunks(tf.data.TFRecordDataset(str(path)), chunk))
        assert [e for _, e in got] == [None] * len(want)
        assert [list(r) for r, _ in got] == [list(r) for r, _ in want]
        assert [len(r) for r, _ in got] == [min(chunk, 23 - i) for i in range(0, 23, chunk)]
    data = path.read_bytes()
    offsets = np.cumsum([0] + [16 + len(r) for r in records])
    cut = tmp_path / "cut.tfrecord"  # ends inside record 11
    cut.write_bytes(data[:offsets[11] + 20])
    flipped = bytearray(data)  # a bit flipped in record 7's data: its CRC fails
    flipped[offsets[7] + 12 + len(records[7]) // 2] ^= 1
    bad = tmp_path / "bad.tfrecord"
    bad.write_bytes(bytes(flipped))
    for damaged, good, what in ((cut, 11, "truncated"), (bad, 7, "corrupted")):
        got = list(tfrecord_file_chunks(str(damaged), 4))
        assert [e for _, e in got[:-1]] == [None] * (len(got) - 1) and what in got[-1][1]
        assert [r for rs, _ in got for r in rs] == records[:good]
    with pytest.raises(DataError, match="unreadable TFRecord file"):
        list(tfrecord_file_chunks(str(tmp_path / "missing.tfrecord"), 4))
