"""``bergson-ray status``: the query services running on the cluster."""

from __future__ import annotations

import argparse
import json

HELP = "list running query services"


def add_parser(sub) -> None:
    p = sub.add_parser("status", help=HELP, description=HELP)
    p.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS or auto)")
    p.add_argument(
        "--namespace", default="bergson_ray", help="Ray namespace of the service's actors"
    )
    p.add_argument("--all_namespaces", action="store_true", help="look in every namespace")
    p.add_argument("--json", action="store_true", help="print the full info as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pipelines.serve import connect_cluster, list_services

    connect_cluster(args.address, args.namespace, start_if_missing=False)
    services = list_services(None if args.all_namespaces else args.namespace)
    if args.json:
        print(json.dumps(services, indent=2, default=str))
        return 0
    if not services:
        print("no query service is running")
        return 0
    for s in services:
        if "error" in s:
            print(f"{s['name']}: NOT ANSWERING ({s['error']})")
            continue
        f = s.get("faiss", {})
        print(
            f"{s['name']}: {s['store']}  rows={s['rows']} dim={s['dim']} "
            f"shards={len(s.get('shards', []))} index={f.get('index_factory')}"
            f"{' cosine' if f.get('unit_norm') else ''}  served={s.get('queries_served')} "
            f"up={s.get('uptime_s')}s{'  http' if s.get('http') else ''}"
        )
    return 0
