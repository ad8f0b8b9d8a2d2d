"""``bergson-ray serve STORE [--name N] [--num_shards K] [--index_factory F] ...``

Starts the query service's detached actors on a running cluster (``--address``,
``RAY_ADDRESS`` or the local one; a loopback head is started if none runs) and returns.
"""

from __future__ import annotations

import argparse
import json

from ..config import ServeConfig
from .args import add_dataclass_args, build_dataclass

HELP = "serve a gradient store for top-k queries (detached Ray actors)"


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help=HELP, description=HELP)
    p.add_argument("store", help="gradient store directory (from `bergson-ray build`)")
    add_dataclass_args(p, ServeConfig, skip=("store",))
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return build_dataclass(ServeConfig, args, store=args.store)


def run(args: argparse.Namespace) -> int:
    from ..pipelines.serve import serve

    cfg = config_from_args(args)
    info = serve(cfg)
    shards = info.get("shards", [])
    loaded = sum(1 for s in shards if s.get("loaded_from_disk"))
    print(
        f"service {info['name']!r} is up: {info['rows']} rows x {info['dim']} in "
        f"{len(shards)} shard(s) ({loaded} loaded from the saved index), "
        f"index {cfg.faiss.index_factory}{' cosine' if cfg.faiss.unit_norm else ''}"
    )
    print(f"  python: bergson_ray.connect(address='auto', name={cfg.name!r}).query([...], k=10)")
    print(f"  cli:    bergson-ray query --name {cfg.name} --query '...'")
    http = info.get("http")
    if isinstance(http, dict):
        print(f"  http:   POST {http['url']}/query  (Authorization: Bearer <token>)")
        print(f"  page:   {http['url']}/  (a web page; it asks for the token)")
        if http.get("token") and http["token"] != "<as given>":
            print(
                f"  token:  {http['token']}   (shown once; set BERGSON_RAY_HTTP_TOKEN to choose it)"
            )
    print(f"  stop:   bergson-ray stop --name {cfg.name}")
    if getattr(args, "log_level", "INFO").upper() == "DEBUG":
        print(json.dumps(info, indent=2, default=str))
    return 0
