"""Submit ``bergson-ray build`` to a running Ray cluster as a Ray job, and follow it.

What it shows: ``ray.job_submission.JobSubmissionClient`` against the cluster's job API
(the dashboard port, 8265), a ``bergson-ray`` command line as the job's entrypoint, and
polling its status and logs. The job's driver runs on the head node: do not pass
``--address`` to bergson-ray inside a job (Ray sets ``RAY_ADDRESS`` for it).

It needs a running cluster whose job API this machine can reach, e.g. through the
tunnel or port-forward of cluster/README.md section 3 (``ray dashboard CONFIG``, or
``kubectl port-forward svc/bergson-ray-head-svc 8265:8265``). With token auth on the
cluster, export ``RAY_AUTH_MODE=token`` (and ``RAY_AUTH_TOKEN`` for KubeRay) first.
If the address cannot be reached it says so and exits with status 2.

The defaults build a p=16 store of the tiny default's ``train[:200]`` (nothing is
downloaded: the nodes build the tiny assets locally). On a multi-node cluster the run
path must be on storage every node sees (``/mnt/shared`` in cluster/).

    .venv/bin/python examples/submit_job.py                          # http://127.0.0.1:8265
    .venv/bin/python examples/submit_job.py http://127.0.0.1:8265 --run_path /mnt/shared/runs/tiny \\
        --model EleutherAI/pythia-14m --dataset NeelNanda/pile-10k --split train --num_workers 4
    .venv/bin/python examples/submit_job.py --no_wait                # print the job id and return
"""

from __future__ import annotations

import argparse
import shlex
import socket
import sys
import time
from urllib.parse import urlparse

DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def reachable(address: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the job API's host:port opens (fails fast, no hang)."""
    url = urlparse(address if "://" in address else f"http://{address}")
    port = url.port or (443 if url.scheme == "https" else 8265)
    try:
        with socket.create_connection((url.hostname or "127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def cannot_reach(address: str, why: str) -> None:
    print(
        f"cannot reach the Ray job API at {address}: {why}\n"
        "Start or tunnel to a cluster first, e.g.\n"
        "  ray dashboard cluster/ray-cluster.gpu.yaml                  # ray up clusters\n"
        "  kubectl port-forward svc/bergson-ray-head-svc 8265:8265     # KubeRay\n"
        "and pass its address: python examples/submit_job.py http://127.0.0.1:8265\n"
        "(token auth: export RAY_AUTH_MODE=token first; see cluster/README.md section 4)",
        file=sys.stderr,
    )
    sys.exit(2)


def entrypoint(args: argparse.Namespace) -> str:
    """The bergson-ray command line the job runs on the head node."""
    cmd = [
        "bergson-ray", "build", args.run_path,
        "--model", args.model,
        "--dataset", args.dataset,
        "--split", args.split,
        "--projection_dim", str(args.projection_dim),
        "--truncation",
        "--num_workers", str(args.num_workers),
    ]  # fmt: skip
    if args.overwrite:
        cmd.append("--overwrite")
    return shlex.join(cmd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default=DEFAULT_ADDRESS, help="job API address")
    parser.add_argument("--run_path", default="/mnt/shared/runs/tiny-index")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dataset", default="tiny")
    parser.add_argument("--split", default="train[:200]")
    parser.add_argument("--projection_dim", type=int, default=16)
    parser.add_argument("--num_workers", type=int, default=1, help="gradient workers (GPUs)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run")
    parser.add_argument(
        "--working_dir",
        help="upload this directory as the job's working dir (e.g. '.' in a checkout: "
        "your local bergson_ray/ then shadows the image's copy)",
    )
    parser.add_argument("--no_wait", action="store_true", help="submit and return")
    args = parser.parse_args()

    if not reachable(args.address):
        cannot_reach(args.address, "no connection")

    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(args.address)  # checks the connection and Ray version
    except (ConnectionError, RuntimeError, AuthenticationError) as err:
        cannot_reach(args.address, str(err).splitlines()[0])

    runtime_env = {"working_dir": args.working_dir} if args.working_dir else None
    for attempt in range(12):
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint(args),
                runtime_env=runtime_env,
                metadata={"submitted_by": "examples/submit_job.py"},
            )
            break
        except RuntimeError as err:  # a head that just started: "No available agent ..."
            if "try again later" not in str(err) or attempt == 11:
                raise
            time.sleep(5)
    print(f"submitted {job_id}: {entrypoint(args)}")
    print(f"follow it with: ray job logs --address {args.address} --follow {job_id}")
    if args.no_wait:
        return

    done = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    status = client.get_job_status(job_id)
    while status not in done:
        time.sleep(5)
        new = client.get_job_status(job_id)
        if new != status:
            print(f"  {job_id}: {new}")
        status = new
    print(client.get_job_logs(job_id)[-3000:])  # the end of the job's output
    print(f"{job_id}: {status}")
    sys.exit(0 if status == JobStatus.SUCCEEDED else 1)


if __name__ == "__main__":
    main()
