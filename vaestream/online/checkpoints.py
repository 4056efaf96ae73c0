"""The online learner's training checkpoints, written by one cached ``SaveV2`` after the first.

``tf.train.CheckpointManager.save`` serializes the object graph of the model, optimizer and step again at every save
(Python work, ~30 ms for a 784-200-10 model and its Adam slots). The graph does not change between saves, only the
values do; so :class:`CachedCheckpoints` saves the first checkpoint through the manager, reads back the checkpoint's
keys and serialized object graph, resolves each key to the variable it holds (by the object graph's child names,
``tf.train.TrackableView.children``) and checks the resolved values against the saved ones bit for bit. Every later
checkpoint is the same keys and graph written by one ``SaveV2`` op (the format ``tf.train.Checkpoint.restore`` and
``tf.train.load_checkpoint`` read), named ``ckpt-STEP`` like the manager's, with the ``checkpoint`` state file updated
and the oldest beyond ``max_to_keep`` deleted as the manager does. When anything does not resolve, every save stays a
full ``CheckpointManager.save``.

The values can be taken (:meth:`CachedCheckpoints.values`, a host copy) at one moment and written later
(:meth:`CachedCheckpoints.write`), e.g. while training goes on.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


def resolve_checkpoint_keys(root, graph: bytes) -> dict[str, object] | None:
    """The object each ``VARIABLE_VALUE`` checkpoint key of the serialized object graph ``graph`` names, found from
    ``root`` (the ``tf.train.Checkpoint`` saved) by the graph's child names; None when a child is not found or a node
    has another kind of saved attribute."""
    import tensorflow as tf
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    proto = trackable_object_graph_pb2.TrackableObjectGraph()
    proto.ParseFromString(graph)
    objects, todo = {0: root}, [0]
    while todo:
        node_id = todo.pop()
        children = tf.train.TrackableView.children(objects[node_id])
        for ref in proto.nodes[node_id].children:
            child = children.get(ref.local_name)
            if child is None:
                return None
            if ref.node_id not in objects:
                objects[ref.node_id] = child
                todo.append(ref.node_id)
    keys = {}
    for node_id, node in enumerate(proto.nodes):
        for attr in node.attributes:
            if attr.name != "VARIABLE_VALUE" or node_id not in objects:
                return None
            keys[attr.checkpoint_key] = objects[node_id]
    return keys


class CachedCheckpoints:
    """Checkpoints ``ckpt-STEP`` of ``checkpoint`` (a ``tf.train.Checkpoint``) in ``directory``, at most
    ``max_to_keep`` kept (see the module docstring). ``manager`` is the ``tf.train.CheckpointManager`` of the first
    (full) save."""

    def __init__(self, checkpoint, directory: str | os.PathLike, max_to_keep: int = 3):
        import tensorflow as tf

        self.checkpoint, self.directory, self.max_to_keep = checkpoint, Path(directory), int(max_to_keep)
        self.manager = tf.train.CheckpointManager(checkpoint, str(self.directory), max_to_keep=max_to_keep)
        self._template = None    # {"keys", "variables", "graph", "read"} once captured
        self._kept: list[str] = []
        self.full_saves = 0

    @property
    def cached(self) -> bool:
        """Whether saves go through the cached ``SaveV2`` (a first full save resolved every key)."""
        return self._template is not None

    def values(self) -> list[np.ndarray] | None:
        """Host copies of the checkpoint's values as they are now, in the cached keys' order (None before the
        first full save)."""
        if self._template is None:
            return None
        return [t.numpy() for t in self._template["read"]()]

    def save(self, step: int) -> str:
        """A checkpoint of the values as they are now; returns its path (``.../ckpt-STEP``)."""
        return self.write(step, self.values())

    def write(self, step: int, values: list[np.ndarray] | None) -> str:
        """Write ``values`` (from :meth:`values`; None: a full save of the variables as they are now, which the
        first save is) as the checkpoint of ``step``; returns its path."""
        import tensorflow as tf

        if values is None or self._template is None:
            path = self.manager.save(checkpoint_number=int(step))
            self.full_saves += 1
            self._capture(path)
            return path
        t = self._template
        path = str(self.directory / f"ckpt-{int(step)}")
        tf.raw_ops.SaveV2(prefix=path, tensor_names=t["keys"] + [OBJECT_GRAPH_KEY],
                          shape_and_slices=[""] * (len(values) + 1),
                          tensors=[tf.constant(v) for v in values] + [tf.constant(t["graph"], tf.string)])
        self._kept = [p for p in self._kept if p != path] + [path]
        old, self._kept = self._kept[:-self.max_to_keep], self._kept[-self.max_to_keep:]
        # the state file as the manager writes it (names relative to the directory; replaced atomically, not
        # synced, as the manager does: it only points ``tf.train.latest_checkpoint`` there, the ledger names its
        # checkpoint itself)
        names = [os.path.basename(p) for p in self._kept]
        tmp = self.directory / "checkpoint.tmp"
        tmp.write_text(f"model_checkpoint_path: {json.dumps(names[-1])}\n" +
                       "".join(f"all_model_checkpoint_paths: {json.dumps(n)}\n" for n in names))
        os.replace(tmp, self.directory / "checkpoint")
        for p in old:
            for f in glob.glob(glob.escape(p) + ".*"):
                os.unlink(f)
        return path

    def _capture(self, path: str) -> None:
        """Keep the keys and object graph of the full checkpoint just written at ``path`` if every key resolves to
        a variable whose value is the one saved (bit for bit)."""
        import tensorflow as tf

        self._template = None
        self._kept = list(self.manager.checkpoints)
        reader = tf.train.load_checkpoint(path)
        keys = sorted(k for k in reader.get_variable_to_shape_map() if k != OBJECT_GRAPH_KEY)
        graph = reader.get_tensor(OBJECT_GRAPH_KEY)
        found = resolve_checkpoint_keys(self.checkpoint, graph)
        if found is None or sorted(found) != keys:
            return
        variables = [found[k] for k in keys]
        read = tf.function(lambda: [tf.identity(tf.convert_to_tensor(v)) for v in variables])
        for k, v in zip(keys, read()):
            saved = reader.get_tensor(k)
            if saved.dtype != v.dtype.as_numpy_dtype or not np.array_equal(saved, v.numpy()):
                return
        self._template = {"keys": keys, "variables": variables, "graph": graph, "read": read}
