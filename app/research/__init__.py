"""The research registry: experiments and runs, metric series, models, datasets with versions,
prompt templates and evaluations, as JSON-RPC namespaces of the job API's endpoint.

Importing this package registers every method on app.training.registry.
"""

from app.research import catalog, datasets, evaluations, experiments, metrics  # noqa: F401
