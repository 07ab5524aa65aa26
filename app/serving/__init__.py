"""Trained policies as OpenAI-compatible Serve applications: the `PolicyServer` with request batching
and weighted A/B routing (`policy`), who may call them (`access`: the job API's credentials, ownership and
sharing, rate limits), and the `models.deploy`/`undeploy`/`deployments`/`share` methods that start and
stop them (`deployments`).

Does not own: training or checkpoints (app.jobs writes those), the job API's own Serve app (app.api.serve).
"""
