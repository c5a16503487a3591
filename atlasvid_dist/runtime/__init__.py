"""Distributed generation on Ray (docs/distribution.md): one proxy worker, N window-sharded detail workers.

* ``driver.DistributedGenerator(cfg, workers, ray_address=None).run()`` -> ``DistributedResult`` (summary with
  the bytes every rank sent); ``atlasvid-dist generate --workers N`` / ``--gpus N`` call it.
* ``cluster``: Ray start-up or join, capacity, placement group, actor creation, timed calls into actors.
* ``supervisor.Stage2Supervisor``: stage 2 over the ranks (restarts after a lost worker, progress, collection).
* ``decode.RankDecoder``: the outputs decoded over the ranks, blended and written by the driver.
* ``actors.ProxyWorker`` / ``actors.DetailWorker``: the Ray actors (plain classes), returning ``results.ProxyResult``
  / ``results.RankResult`` (frozen dataclasses).
* ``detail.denoise_rank`` / ``proxy.denoise_proxy_rank``: ``pipeline/stages.py``'s stage 2 / stage 1 on one rank's
  share of the tokens (its layout: ``detail.RankWindows``, with ``parallel.window_attention``; ``proxy.ProxySlice``).
"""
