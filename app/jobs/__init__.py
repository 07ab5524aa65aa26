"""The job system: the `training.*` JSON-RPC methods (`training`), the Dispatcher actor that turns
queued jobs into Ray Jobs (`dispatcher`), the run's database reporter with budgets and cost
(`reporter`), job-event webhooks (`webhooks`), and what a request may make the cluster import, run or
load (`trust`: the allow-lists and the one model policy, `resolve_model`).

Does not own: HTTP and auth (app.api), tables and queries (app.data), the GRPO engine it launches
(grpo: a run is `python -m grpo.run --reporter app.jobs.reporter:DBReporter`).
"""
