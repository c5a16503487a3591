"""Submit an atlasvid-dist generate or train run as a Ray job, follow its logs, exit with its outcome.

    python cluster/submit_job.py --address http://HEAD:8265 generate -- --gpus 8 --res 8k --prompt "..." --out /shared/out/a.mp4
    python cluster/submit_job.py --address http://HEAD:8265 --gpus 8 train -- --stage 1 --data /shared/data --model /shared/models/wan --output /shared/runs/s1 --num-processes 8
    python cluster/submit_job.py ... --dry-run     # print the request, submit nothing

The job's driver runs `atlasvid-dist generate ...` on the cluster: it joins the cluster Ray put it in (Ray sets
RAY_ADDRESS for job drivers) and places its actors with a placement group there. `train` runs the same command as
on one machine (torch.distributed under DeepSpeed) on the node the driver lands on, so it asks for that node's
GPUs as the entrypoint's resources. ``--working-dir .`` ships this repository with the job (nodes without the
package installed: add ``--pip`` to install it from the working dir); with Ray 2.60 token auth, export
RAY_AUTH_MODE=token and the cluster's token first (see cluster/README.md).

Exit code: 0 when the job succeeded, 1 when it failed or was stopped, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys

ENV = {"HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
        help="the cluster's job API (dashboard) address",
    )
    p.add_argument("--working-dir", default=None, help="a folder shipped with the job (e.g. this repository)")
    p.add_argument("--pip", action="store_true", help="pip install the working dir on the nodes (runtime env)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs for the entrypoint itself (train: the node's GPUs)")
    p.add_argument("--dry-run", action="store_true", help="print the request and exit")
    p.add_argument("--no-follow", action="store_true", help="submit and print the job id, do not wait")
    p.add_argument("command", choices=("generate", "train"))
    p.add_argument("args", nargs=argparse.REMAINDER, help="after --: the command's own options")
    ns = p.parse_args(argv)
    ns.args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    if ns.gpus < 0:
        p.error("--gpus must be >= 0")
    if ns.pip and not ns.working_dir:
        p.error("--pip installs the working dir: give --working-dir")
    return ns


def request(ns: argparse.Namespace) -> dict:
    """The submit_job keyword arguments for these options."""
    env: dict = {"env_vars": dict(ENV)}
    if ns.working_dir:
        env["working_dir"] = ns.working_dir
        if ns.pip:
            env["pip"] = ["."]
    entry = shlex.join(["atlasvid-dist", ns.command, *ns.args])
    return {"entrypoint": entry, "runtime_env": env, "entrypoint_num_cpus": 1, "entrypoint_num_gpus": ns.gpus}


async def follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def main(argv: list[str] | None = None) -> int:
    ns = parse(sys.argv[1:] if argv is None else argv)
    req = request(ns)
    if ns.dry_run:
        print(json.dumps({"address": ns.address, **req}, indent=2))
        return 0
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ns.address)
    job_id = client.submit_job(**req)
    print(f"submitted {job_id} to {ns.address}: {req['entrypoint']}", flush=True)
    if ns.no_follow:
        return 0
    asyncio.run(follow(client, job_id))
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
