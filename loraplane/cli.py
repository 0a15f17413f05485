"""The `loraplane` command line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from loraplane.controlplane.v1 import tenant_pb2
from loraplane.operator import Operator

TIERS = {"shared": tenant_pb2.TIER_SHARED, "reserved": tenant_pb2.TIER_RESERVED, "dedicated": tenant_pb2.TIER_DEDICATED}


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(args.data_dir or os.environ.get("LORAPLANE_DATA_DIR", ".loraplane"))


def _operator(args: argparse.Namespace) -> tuple[str, str]:
    """(control plane address, operator token): from the environment, else the embedded stack's."""
    addr = os.environ.get("LORAPLANE_CONTROLPLANE_ADDR", "127.0.0.1:50051")
    token = os.environ.get("LORAPLANE_OPERATOR_TOKEN")
    if not token:
        secrets = _data_dir(args) / "secrets.json"
        if not secrets.exists():
            sys.exit("set LORAPLANE_OPERATOR_TOKEN (or run from the directory where `loraplane up` runs)")
        token = json.loads(secrets.read_text())["operator_token"]
    return addr, token


def cmd_up(args: argparse.Namespace) -> int:
    from loraplane.stack import Stack, StackConfig

    d = _data_dir(args)
    stack = Stack(StackConfig(data_dir=d, redis_url=os.environ.get("LORAPLANE_REDIS_URL", ""), log_dir=d / "logs"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"starting loraplane (logs in {d / 'logs'}) ...", flush=True)
    try:
        stack.start()
        print(
            f"""
loraplane is up.
  OpenAI API (data plane)   {stack.http_url}/v1
  gRPC (control plane)      {stack.grpc_addr}
  base model                tiny-llama
  Redis                     {stack.redis_url}

Create a tenant and its API key (in another shell, from this directory):
  .venv/bin/loraplane tenant create acme --tier shared

Press Ctrl-C to stop.""",
            flush=True,
        )
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
    return 0


def cmd_tenant_create(args: argparse.Namespace) -> int:
    addr, token = _operator(args)
    try:
        resp = Operator(addr, token).create_tenant(args.name, TIERS[args.tier])
    except grpc.RpcError as err:
        sys.exit(f"error: {err.details()}")
    if args.json:
        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True)))
    else:
        print(f"tenant  {resp.tenant.name} ({resp.tenant.id}), tier {args.tier}")
        print(f"api key {resp.api_key}")
        print("(the key is shown only this once)")
    return 0


def cmd_tenant_list(args: argparse.Namespace) -> int:
    addr, token = _operator(args)
    for t in Operator(addr, token).list_tenants().tenants:
        print(f"{t.id}  {t.name}  {tenant_pb2.Tier.Name(t.tier).removeprefix('TIER_').lower()}")
    return 0


def cmd_make_adapter(args: argparse.Namespace) -> int:
    from loraplane import devadapter, tinymodel

    base = tinymodel.build(_data_dir(args) / "models" / "tiny-llama")
    out = devadapter.train(base, Path(args.out), args.phrase, rank=args.rank)
    print(f"wrote {out / 'adapter_model.safetensors'} (answers every prompt with {args.phrase!r})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraplane")
    parser.add_argument("--data-dir", help="the embedded stack's directory (default .loraplane)")
    sub = parser.add_subparsers(required=True)
    up = sub.add_parser("up", help="run the whole stack on this machine")
    up.set_defaults(func=cmd_up)
    tenant = sub.add_parser("tenant", help="manage tenants (operator)").add_subparsers(required=True)
    create = tenant.add_parser("create", help="create a tenant and print its API key")
    create.add_argument("name")
    create.add_argument("--tier", choices=sorted(TIERS), default="shared")
    create.add_argument("--json", action="store_true", help="print JSON")
    create.set_defaults(func=cmd_tenant_create)
    tenant.add_parser("list", help="list tenants").set_defaults(func=cmd_tenant_list)
    make = sub.add_parser("make-adapter", help="train a small demo adapter for tiny-llama on the CPU")
    make.add_argument("out", help="output directory")
    make.add_argument("--phrase", default="red apple river", help="what the adapter makes the model say")
    make.add_argument("--rank", type=int, default=8)
    make.set_defaults(func=cmd_make_adapter)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
