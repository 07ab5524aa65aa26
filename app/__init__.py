"""raygrpo's control plane: the job API on Ray Serve and everything behind it.

One package a capability; the arrows are the only imports allowed between them (tests/test_layout.py):

    app.client    the SDK and the `raygrpo` CLI; needs httpx, pydantic, typer, rich, pyyaml only
    app.api       HTTP/JSON-RPC core: the FastAPI app and its Serve wrapper, auth, rate limits,
                  Prometheus metrics, the method registry        -> app.data
    app.research  the research registry (experiments, metric series, models, datasets, ...)
                                                                  -> app.api, app.data
    app.jobs      the job system: training.* methods, dispatcher, run reporter, webhooks, budgets
                                                                  -> app.research, app.api, app.data
    app.serving   trained policies on Serve (PolicyServer) and models.deploy/undeploy
                                                                  -> app.jobs, app.api, app.data
    app.data      tables, data access, migrations, the Redis fast path of the queue
    app.settings  typed settings from the environment, read by every package

`app.api.main` and `app.api.serve` are the composition root: they import every capability to
register its methods, and nothing imports them back. `grpo` (the engine) never imports `app`.
"""
