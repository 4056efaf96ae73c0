"""Serving: the exported SavedModel and what serves it.

* :mod:`~vaestream.serving.export` -- ``export`` / ``load_export``: the SavedModel and its signatures;
* :mod:`~vaestream.serving.server` -- ``ModelServer`` and the TF-Serving-compatible REST handler;
* :mod:`~vaestream.serving.rest_server`, :mod:`~vaestream.serving.grpc_server` -- the transports;
* :mod:`~vaestream.serving.main` -- ``serve``: the server process, both transports over one ``ModelServer``;
* :mod:`~vaestream.serving.protocol` -- the wire names both ends share (dtypes, status codes, errors, JSON);
* :mod:`~vaestream.serving.batching` -- server-side dynamic batching;
* :mod:`~vaestream.serving.client` -- ``Client`` (REST) and ``GrpcClient``.
"""
