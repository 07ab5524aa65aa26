"""The digit run on one Ray node against two, with its files in a bucket, and the time a node loss costs.

    python bench/multinode.py [--seed 0] [--target 0.9] [--window 10] [--max-steps 300]

Every case is `python -m grpo.run` against a cluster of Ray's own `ray.cluster_utils.Cluster` on this machine
(a raylet and object store per node; the head holds no CPU, so the run lives on the worker nodes) and
`storage=s3://...` on a moto S3 server on loopback: the digit task on `grpo.tiny`, 2 policy ranks, 1 rollout
and 1 reward actor, 16 prompts x 8, 6 tokens, lr 1e-3, no KL, stopping once the mean reward of the last
`--window` steps reaches `--target`.

- one node: one 6-CPU node, PACK (both ranks on it);
- two nodes: two 3-CPU nodes, STRICT_SPREAD (a rank on each; the gradients' all-reduce crosses raylets);
- node loss: as two nodes, checkpoint every 5 steps; once the checkpoint of step 10 is in the bucket the node
  of a rank is removed (no graceful drain) and a fresh node added. Timed: from the removal to the driver's
  `resumed from the checkpoint of step k`, and to the run's end; the steps stored are checked once each.

Printed per case: seconds to the first step, steps to the target, median seconds per step, median publish
seconds, process seconds; then the ratio two nodes / one node of seconds per step. All nodes share this
machine's 2 cores, so the two-node figure is what the extra raylets and the cross-node gloo cost, not what
a second machine would add.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _s3() -> tuple[subprocess.Popen, str]:
    import boto3
    import httpx

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(endpoint, timeout=2)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return proc, "s3://bench"


def case(name: str, model: str, bucket: str, args: argparse.Namespace, *, nodes: list[int], strategy: str,
         lose_at: int | None = None) -> dict:
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from grpo import storage
    from grpo.run import latest_checkpoint
    from grpo.trainer import checkpoint_step

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "dashboard_host": "127.0.0.1",
                                                            "dashboard_port": _free_port(),
                                                            "dashboard_agent_listen_port": _free_port()})
    workers = [cluster.add_node(num_cpus=n, dashboard_agent_listen_port=_free_port()) for n in nodes]
    cluster.wait_for_nodes()
    run = f"{bucket}/{name}"
    cmd = [sys.executable, "-m", "grpo.run", f"model={model}", "task=digit", f"storage={bucket}", f"run_name={name}",
           f"seed={args.seed}", "prompts_per_step=16", "group_size=8", "max_new_tokens=6", "learning_rate=1e-3",
           "kl_coef=0.0", "loss_agg=token-mean", "eval_size=0", f"num_steps={args.max_steps}",
           f"target_reward={args.target}", f"target_window={args.window}", "num_policy_workers=2",
           "num_rollout_workers=1", "num_reward_workers=1", "cpus_per_worker=1", "cpus_per_reward_worker=0.5",
           f"placement_strategy={strategy}", f"checkpoint_interval={5 if lose_at else 0}"]
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"}
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.time(), x) for x in iter(proc.stdout.readline, "")),
                              daemon=True)
    reader.start()
    lost_at = None
    try:
        if lose_at:
            while (latest := latest_checkpoint(run)) is None or checkpoint_step(latest) < lose_at:
                if proc.poll() is not None:
                    break
                time.sleep(0.2)
            if proc.poll() is None:
                ranks = {a.node_id for a in list_actors(address=f"http://{cluster.head_node.address_info['webui_url']}",
                                                        filters=[("class_name", "=", "RayTrainWorker"),
                                                                 ("state", "=", "ALIVE")])}
                lost = next(n for n in workers if n.node_id in ranks)
                lost_at = time.time()
                cluster.remove_node(lost, allow_graceful=False)
                cluster.add_node(num_cpus=nodes[0])
        proc.wait()
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.shutdown()
    end = time.time()
    text = "".join(x for _, x in lines)
    rows = [json.loads(x) for x in storage.read_bytes(f"{run}/metrics.jsonl").decode().splitlines() if x.strip()]
    first = re.search(r"first step ([\d.]+) s after the start", text)
    out = {"case": name, "first_step_s": float(first.group(1)) if first else None, "steps": len(rows),
           "s_per_step": statistics.median(r["step_time_s"] for r in rows),
           "publish_s": statistics.median(r["publish_time_s"] for r in rows), "process_s": end - t0,
           "reward_last": statistics.mean(r["reward_mean"] for r in rows[-args.window:]),
           "each_step_once": [r["step"] for r in rows] == list(range(1, len(rows) + 1)), "rc": proc.returncode}
    if lost_at is not None:
        resumed = next((t for t, x in lines if "resumed from the checkpoint of step" in x), None)
        out["resume_s"] = resumed - lost_at if resumed else None
        out["after_loss_to_end_s"] = end - lost_at
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--cases", default="one,two,loss")
    args = p.parse_args()
    os.environ.pop("RAY_ADDRESS", None)
    from grpo.tiny import save_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-multinode-"))
    os.environ["RAYGRPO_CACHE"] = str(tmp / "cache")
    model = str(save_tiny_model(tmp / "tiny", seed=0))
    moto, bucket = _s3()
    print(f"# bench/multinode.py, {datetime.date.today()}, {os.cpu_count()} cores; digit on grpo.tiny, 16 x 8, "
          f"6 tokens, lr 1e-3, target {args.target} over {args.window} steps, seed {args.seed}; storage {bucket}")
    results = {}
    try:
        for name in args.cases.split(","):
            kw = {"one": {"nodes": [6], "strategy": "PACK"}, "two": {"nodes": [3, 3], "strategy": "STRICT_SPREAD"},
                  "loss": {"nodes": [3, 3], "strategy": "STRICT_SPREAD", "lose_at": 10}}[name]
            results[name] = r = case(name, model, bucket, args, **kw)
            print(json.dumps(r), flush=True)
    finally:
        moto.terminate()
    print(f"{'case':<6} {'first step s':>12} {'steps':>6} {'s/step':>7} {'publish s':>9} {'process s':>9} {'resume s':>8}")
    for r in results.values():
        print(f"{r['case']:<6} {r['first_step_s'] or float('nan'):>12.1f} {r['steps']:>6} {r['s_per_step']:>7.3f} "
              f"{r['publish_s']:>9.4f} {r['process_s']:>9.1f} {r.get('resume_s') or float('nan'):>8.1f}")
    if "one" in results and "two" in results:
        print(f"s/step, two nodes / one node: {results['two']['s_per_step'] / results['one']['s_per_step']:.2f}x")


if __name__ == "__main__":
    main()
