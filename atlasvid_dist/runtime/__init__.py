"""Distributed generation on Ray (docs/distribution.md): one proxy worker, N window-sharded detail workers.

* ``driver.DistributedGenerator(cfg, workers, ray_address=None).run()`` -> ``DistributedResult`` (summary with
  the bytes every rank sent); ``atlasvid-dist generate --workers N`` / ``--gpus N`` call it.
* ``actors.ProxyWorker`` / ``actors.DetailWorker``: the Ray actors (plain classes).
* ``detail.denoise_rank``: stage 2 on one rank's latent strip, with ``parallel.window_attention``.
"""
