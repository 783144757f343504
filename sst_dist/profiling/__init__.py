"""Throughput profiling of an SST run (``sst-dist profile``), split by job.

- :mod:`.ranges`: ``record_function`` ranges installed around the trainer's phases from the
  outside (forward hooks on model submodules, wrappers on bank/pseudo/collective functions).
- :mod:`.breakdown`: per-phase forward/backward time from a ``torch.profiler`` trace.
- :mod:`.measure`: images/s of the data pipeline, the model step and the whole step; peak memory.
- :mod:`.report`: multi-rank aggregation, JSON, table and PNG bar chart.
"""
