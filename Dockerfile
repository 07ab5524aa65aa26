# The image every manifest in kuberay/ names (raygrpo:<version>): Ray 2.60.0 with raygrpo installed.
#   docker build -t raygrpo:0.1.0 .
# The GPU base (CUDA) serves head, CPU and GPU pods alike; for CPU-only clusters build with
#   --build-arg RAY_TAG=2.60.0-py311 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu
# WORKDIR is the project: a RayJob's runtimeEnvYAML `working_dir: .` uploads it from the submitter pod,
# and `alembic -c app/data/alembic.ini` (the migration Job) finds its config there.
ARG RAY_TAG=2.60.0-py311-gpu
FROM rayproject/ray:${RAY_TAG}

ARG TORCH_INDEX=""
# bubblewrap: the only place user code runs (reward source, code rewards, the python tool; grpo/sandbox.py).
# Without it such jobs are refused, never run with less isolation.
USER root
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap && rm -rf /var/lib/apt/lists/*
USER ray
WORKDIR /home/ray/raygrpo
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users app ./app
COPY --chown=ray:users grpo ./grpo
COPY --chown=ray:users kuberay/run-configs ./kuberay/run-configs
# Ray itself is already in the base image at the pinned version; the `all` extra adds torch, transformers and the API's
# dependencies. A non-editable install: the copied sources stay as the job working_dir, site-packages serves imports.
RUN if [ -n "$TORCH_INDEX" ]; then pip install --no-cache-dir --index-url "$TORCH_INDEX" torch; fi \
 && pip install --no-cache-dir ".[all]" \
 && python -c "import ray, torch, transformers, app.api.serve, grpo.run; assert ray.__version__ == '2.60.0', ray.__version__" \
 && python -c "from grpo.sandbox import status; print('code sandbox:', status())"

ENV RAYGRPO_HOME=/mnt/raygrpo \
    RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS=0 \
    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=app.api.proxy:middlewares
