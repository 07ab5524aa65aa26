"""The Python SDK and the `raygrpo` CLI: what a user installs on a laptop (`pip install raygrpo[client]`).

Needs only httpx, pydantic, typer, rich and pyyaml; importing it loads no Ray, torch or SQL. The CLI's
local-stack commands (`raygrpo up`, `token`, `db upgrade`, `plot`) import the server side lazily and
say which extra to install when it is missing.

    from app.client import Client, NotFound
    c = Client("http://127.0.0.1:8001", token=TOKEN)
"""

from app.client.sdk import (
    FINAL,
    AsyncClient,
    BudgetExceeded,
    CannotCancel,
    CheckpointRef,
    Client,
    Deployment,
    DeploymentFailed,
    Deployments,
    Evaluation,
    EvaluationFailed,
    ExportLimitExceeded,
    Forbidden,
    InternalError,
    InvalidParams,
    InvalidRequest,
    JobPage,
    JobStatus,
    MethodNotFound,
    Metrics,
    NotFound,
    ParseError,
    RateLimited,
    RaygrpoError,
    StartResult,
    Trajectory,
    TrajectoryPage,
    TransportError,
    Unauthenticated,
    ValidationFailed,
)

__all__ = [
    "FINAL", "AsyncClient", "BudgetExceeded", "CannotCancel", "CheckpointRef", "Client", "Deployment",
    "DeploymentFailed", "Deployments", "Evaluation", "EvaluationFailed", "ExportLimitExceeded", "Forbidden",
    "InternalError", "InvalidParams", "InvalidRequest", "JobPage", "JobStatus", "MethodNotFound", "Metrics",
    "NotFound", "ParseError", "RateLimited", "RaygrpoError", "StartResult", "Trajectory", "TrajectoryPage",
    "TransportError", "Unauthenticated", "ValidationFailed",
]
