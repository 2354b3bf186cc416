"""The HTTP face of the black box: ``divqat serve``, a prediction API with API keys, budgets,
rate limits and an audit log (a driver, like ``divqat.pipelines``).

- ``store``: the SQLite key database: keys (stored as hashes), budgets, rate windows, the audit
  log, and the accounting that counts every image before it is answered.
- ``batcher``: dynamic batching of concurrent requests into one victim call.
- ``app``: the FastAPI app: ``/v1/predict``, ``/v1/model``, ``/healthz``, ``/metrics``.
- ``server``: load a victim and its defense, warm it up, run the app under uvicorn.

The thief's side is ``divqat.remote.RemoteBlackBox``; ``divqat attack --victim http://...``
steals through it.

    $ divqat keys create thief --budget 5000 --db keys.db > thief.key
    $ divqat serve --victim runs/qat --defense dcp --param beta=0.5 --db keys.db --port 8000
    $ divqat attack --victim http://127.0.0.1:8000 --api-key-file thief.key --attack knockoff ...
"""
