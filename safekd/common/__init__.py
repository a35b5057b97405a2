"""The floor every layer stands on, importing nothing else of safekd: the batch protocol
(:mod:`~safekd.common.batches`), process-group helpers (:mod:`~safekd.common.distributed`), constraint
measurements as sums and counts reduced over ranks (:mod:`~safekd.common.measurement`) and
``"module:object"`` references (:mod:`~safekd.common.references`).
"""
