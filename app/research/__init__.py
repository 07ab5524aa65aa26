"""The research registry: experiments and runs, metric series, models, datasets with versions,
prompt templates and evaluations, as JSON-RPC namespaces of the job API's endpoint.

app.api.main imports the method modules (registering them on app.api.context.registry); this package
itself imports nothing, so a run's reporter can use app.research.series without loading the API.
"""
