"""Application metrics of the Serve replicas, through Ray's metrics API (``ray.serve.metrics``).

Ray exports them in Prometheus format on every node's metrics port (``ray start --metrics-export-port``, or
``ray._private.worker._global_node.metrics_export_port``), with Serve's ``deployment``, ``replica`` and
``application`` tags added. Names start with ``sarl_``, and Ray's exporter puts ``ray_`` before them: Prometheus
sees ``ray_sarl_requests_total``, histograms as ``_bucket`` / ``_sum`` / ``_count``:

====================================  =========  ======================================================
``sarl_requests_total``               counter    requests answered, by ``status`` (HTTP) and ``reason``
``sarl_decode_seconds``               histogram  image decode and transform, per request
``sarl_queue_seconds``                histogram  wait for a batch (dynamic batching), per request
``sarl_forward_seconds``              histogram  one batched forward, transfers included, per batch
``sarl_batch_size``                   histogram  images per batch
``sarl_vocabulary_info``              gauge      1 for the served ``version`` (0 once replaced), with ``model_id``
``sarl_model_info``                   gauge      1, with the replica's ``model_id`` and checkpoint ``digest``
``sarl_vocabulary_reloads_total``     counter    reload attempts by ``outcome`` (``loaded`` or an error kind)
====================================  =========  ======================================================
"""

from __future__ import annotations

from ray.serve import metrics

LATENCY_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class ServeMetrics:
    """The metrics of one replica (created in the replica, so Serve's tags are filled in)."""

    def __init__(self, model_id: str, digest: str) -> None:
        self.model_id = model_id
        self.requests = metrics.Counter("sarl_requests", "Prediction API requests by HTTP status and reason",
                                        tag_keys=("status", "reason"))
        self.decode = metrics.Histogram("sarl_decode_seconds", "Image decode and transform time per request",
                                        boundaries=LATENCY_BOUNDARIES)
        self.queue = metrics.Histogram("sarl_queue_seconds", "Time a request waited for its batch",
                                       boundaries=LATENCY_BOUNDARIES)
        self.forward = metrics.Histogram("sarl_forward_seconds", "Batched forward time, transfers included",
                                         boundaries=LATENCY_BOUNDARIES)
        self.batch_size = metrics.Histogram("sarl_batch_size", "Images per batch", boundaries=BATCH_BOUNDARIES)
        self.vocabulary = metrics.Gauge("sarl_vocabulary_info", "1 for the vocabulary version a replica serves",
                                        tag_keys=("version", "model_id"))
        self.reloads = metrics.Counter("sarl_vocabulary_reloads", "Vocabulary reload attempts by outcome",
                                       tag_keys=("outcome",))
        self.model = metrics.Gauge("sarl_model_info", "1 for the model a replica serves",
                                   tag_keys=("model_id", "digest"))
        self._model_tags = {"model_id": model_id, "digest": digest}
        self.model.set(1, tags=self._model_tags)
        self._served_version: str | None = None

    def request(self, status: int, reason: str) -> None:
        self.requests.inc(tags={"status": str(status), "reason": reason})

    def served(self, version: str) -> None:
        """The replica now serves ``version``: its gauge is 1, the previous one's 0. Called on every poll of the
        store: a gauge set once is no longer exported after a few minutes (seen on Ray 2.60 with a replica up 10
        minutes), so both info gauges are set again each time."""
        if self._served_version is not None and self._served_version != version:
            self.vocabulary.set(0, tags={"version": self._served_version, "model_id": self.model_id})
        self.vocabulary.set(1, tags={"version": version, "model_id": self.model_id})
        self.model.set(1, tags=self._model_tags)
        self._served_version = version

    def reload(self, outcome: str) -> None:
        self.reloads.inc(tags={"outcome": outcome})


__all__ = ["ServeMetrics"]
