"""The `loraplane` command line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from loraplane import tenantcli, usagereport
from loraplane.controlplane.v1 import tenant_pb2, worker_pb2
from loraplane.operator import Operator

if TYPE_CHECKING:
    from loraplane.stack import Stack, StackConfig

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


def up_config(data_dir: Path, workers: int = 1) -> StackConfig:
    """The stack `loraplane up` runs: `workers` vLLM workers of tiny-llama, the first's vLLM on
    port 8100, the next ones' on 8101, 8102, …"""
    from loraplane.stack import StackConfig, WorkerSpec

    config = StackConfig(
        data_dir=data_dir, redis_url=os.environ.get("LORAPLANE_REDIS_URL", ""), log_dir=data_dir / "logs",
        metrics_port=9090,
    )  # fmt: skip
    return replace(config, extra_workers=tuple(WorkerSpec(config.vllm_port + i) for i in range(1, workers)))


def banner(stack: Stack) -> str:
    """What `loraplane up` prints once the stack serves."""
    workers = [f"{worker_id} (vLLM {url})" for worker_id, url in stack.workers()]
    label = "workers" if len(workers) > 1 else "worker"
    listed = ("\n" + " " * 28).join(workers)
    return f"""
loraplane is up.
  OpenAI API (data plane)   {stack.http_url}/v1
  gRPC (control plane)      {stack.grpc_addr}
  base model                tiny-llama
  {label:<26}{listed}
  Redis                     {stack.redis_url}

Create a tenant and its API key (in another shell, from this directory):
  .venv/bin/loraplane tenant create acme --tier shared

Press Ctrl-C to stop."""


def cmd_up(args: argparse.Namespace) -> int:
    from loraplane.stack import Stack

    d = _data_dir(args)
    stack = Stack(up_config(d, args.workers))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"starting loraplane (logs in {d / 'logs'}) ...", flush=True)
    try:
        stack.start()
        print(banner(stack), flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
    return 0


def _op(args: argparse.Namespace) -> Operator:
    return Operator(*_operator(args))


def _show(message: Message) -> None:
    print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2))


def _tier(t: tenant_pb2.Tenant) -> str:
    return tenant_pb2.Tier.Name(t.tier).removeprefix("TIER_").lower()


def cmd_tenant_create(args: argparse.Namespace) -> None:
    resp = _op(args).create_tenant(args.name, TIERS[args.tier])
    if args.json:
        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True)))
    else:
        print(f"tenant  {resp.tenant.name} ({resp.tenant.id}), tier {args.tier}")
        print(f"api key {resp.api_key}")
        print("(the key is shown only this once)")


def _limits(t: tenant_pb2.Tenant) -> str:
    """`rpm 600, tpm 400000, concurrency 32 (tier)`: the limits in force, and whose they are."""
    values = [f"{name} {getattr(t.limits, name) or 'unlimited'}" for name in ("rpm", "tpm", "concurrency")]
    return f"{', '.join(values)} ({'own' if t.own_limits else 'tier'})"


def _capacity(t: tenant_pb2.Tenant) -> str:
    """`pinned 1/2 (tier), spill-over off, pool w-1 w-2`: its pins of its allowance, and where its
    requests go."""
    workers = f"pool {' '.join(t.pool_worker_ids)}" if t.pool_worker_ids else "shared workers"
    pins = f"pinned {len(t.pinned_adapter_ids)}/{t.pinned_slots} ({'own' if t.own_pinned_slots else 'tier'})"
    return f"{pins}, spill-over {'on' if t.spill_over else 'off'}, {workers}"


def _tenant_line(t: tenant_pb2.Tenant) -> str:
    return f"{t.id}  {t.name}  {_tier(t)}{'  suspended' if t.suspended else ''}  {_limits(t)}  {_capacity(t)}"


def cmd_tenant_list(args: argparse.Namespace) -> None:
    for t in _op(args).list_tenants().tenants:
        print(_tenant_line(t))


def cmd_tenant_set_tier(args: argparse.Namespace) -> None:
    _show(_op(args).set_tier(args.tenant_id, TIERS[args.tier]))


def cmd_tenant_set_limits(args: argparse.Namespace) -> None:
    """Flags not given keep the limits in force now (the tier's, until the tenant has its own)."""
    given = {name: getattr(args, name) for name in ("rpm", "tpm", "concurrency") if getattr(args, name) is not None}
    if args.tier_default and given:
        raise tenantcli.CliError("--tier-default takes no --rpm, --tpm or --concurrency")
    if not args.tier_default and not given:
        raise tenantcli.CliError("give --rpm, --tpm or --concurrency, or --tier-default")
    op = _op(args)
    limits = None
    if not args.tier_default:
        current = next((t for t in op.list_tenants().tenants if t.id == args.tenant_id), None)
        if current is None:
            raise tenantcli.CliError(f"tenant {args.tenant_id!r} does not exist")
        limits = tenant_pb2.RateLimits()
        limits.CopyFrom(current.limits)
        for name, value in given.items():
            setattr(limits, name, value)
    print(_tenant_line(op.set_limits(args.tenant_id, limits)))


def cmd_tenant_set_capacity(args: argparse.Namespace) -> None:
    """Flags not given leave that part as it is."""
    if args.tier_default_pins and args.pinned_slots is not None:
        raise tenantcli.CliError("--tier-default-pins takes no --pinned-slots")
    if args.pinned_slots is None and not args.tier_default_pins and args.spill_over is None:
        raise tenantcli.CliError("give --pinned-slots or --tier-default-pins, and/or --spill-over or --no-spill-over")
    tenant = _op(args).set_capacity(args.tenant_id, args.pinned_slots, args.tier_default_pins, args.spill_over)
    print(_tenant_line(tenant))


def cmd_tenant_usage(args: argparse.Namespace) -> None:
    start, end = usagereport.time_range(args, time.time())
    rows = list(_op(args).usage(start, end, args.bucket_width, tenant_id=args.tenant_id))
    if args.json:
        print(json.dumps([{f.name: getattr(r, f.name) for f in r.DESCRIPTOR.fields} for r in rows], indent=2))
        return
    lines = [
        usagereport.Line(
            start=r.start_time,
            model=r.model,
            adapter_id=r.adapter_id,
            input_tokens=r.input_tokens,
            cached_tokens=r.input_cached_tokens,
            output_tokens=r.output_tokens,
            requests=r.num_model_requests,
        )
        for r in rows
    ]
    print(usagereport.render(lines, args.bucket_width, adapters=True))


def _count(text: str) -> int:
    """A rate limit flag: 0 (unlimited) or more."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not 0 (unlimited) or a positive whole number")
    return n


def _positive(text: str) -> int:
    """A count of 1 or more."""
    n = int(text) if text.isdigit() else 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return n


def cmd_tenant_suspend(args: argparse.Namespace) -> None:
    _show(_op(args).suspend(args.tenant_id, suspended=args.suspend))


def cmd_key_create(args: argparse.Namespace) -> None:
    resp = _op(args).create_key(args.tenant_id)
    print(f"api key {resp.api_key}\n(the key is shown only this once; its prefix is {resp.key_prefix})")


def cmd_key_list(args: argparse.Namespace) -> None:
    for k in _op(args).list_keys(args.tenant_id):
        print(f"{k.key_prefix}  {k.created_at.ToDatetime():%Y-%m-%d %H:%M:%S}")


def cmd_key_revoke(args: argparse.Namespace) -> None:
    _op(args).revoke_key(args.prefix)
    print(f"revoked {args.prefix}")


def _worker_state(w: worker_pb2.Worker) -> str:
    """healthy; the engine's state when the agent says it is not serving (crash_loop, …); else down."""
    if w.healthy:
        return "healthy"
    return w.engine_state if w.engine_state not in ("", "serving") else "down"


def _worker_json(w: worker_pb2.Worker) -> dict[str, object]:
    return {
        "worker_id": w.worker_id,
        "base_model": w.base_model,
        "endpoint": w.endpoint,
        "state": _worker_state(w),
        "pool_tenant_id": w.pool_tenant_id,
        "draining": w.draining,
        "max_adapters": w.max_adapters,
        "max_concurrency": w.max_concurrency,
        "gpu_slots": w.gpu_slots,
        "resident_adapter_ids": list(w.resident_adapter_ids),
        "pinned_adapter_ids": list(w.pinned_adapter_ids),
        "cached_adapter_ids": list(w.cached_adapter_ids),
        "engine_state": w.engine_state,
        "engine_restarts": w.engine_restarts,
        "engine_last_error": w.engine_last_error,
    }


def _worker_slots(w: worker_pb2.Worker) -> str:
    """Adapters loaded of the most it holds ("3/8"); with a host-memory tier, its GPU slots too
    ("3/32 loaded, 8 gpu"); then how many its node's disk cache holds besides, if any."""
    slots = f"{len(w.resident_adapter_ids)}/{w.max_adapters}"
    if w.gpu_slots and w.gpu_slots != w.max_adapters:
        slots += f" loaded, {w.gpu_slots} gpu"
    if w.cached_adapter_ids:
        slots += f", {len(w.cached_adapter_ids)} cached"
    return slots


def cmd_worker_list(args: argparse.Namespace) -> None:
    workers = _op(args).list_workers().workers
    if args.json:
        print(json.dumps([_worker_json(w) for w in workers], indent=2))
        return
    for w in workers:
        state = _worker_state(w) + ("  draining" if w.draining else "")
        pool = f"pool {w.pool_tenant_id}" if w.pool_tenant_id else "shared"
        slots = _worker_slots(w)
        print(f"{w.worker_id}  {w.base_model}  {state}  {pool}  {slots}  {w.endpoint}  restarts {w.engine_restarts}")
        if w.engine_last_error:
            print(f"    last error: {w.engine_last_error}")
        for adapter_id in w.resident_adapter_ids:
            print(f"    {adapter_id}{' (pinned)' if adapter_id in w.pinned_adapter_ids else ''}")


def cmd_worker_assign(args: argparse.Namespace) -> None:
    resp = _op(args).assign_worker(args.worker_id, args.tenant_id)
    evicted = " ".join(resp.evicted_adapter_ids) or "nothing"
    print(f"{resp.worker_id} is in the pool of {resp.tenant_id}; evicted {evicted}")


def cmd_worker_unassign(args: argparse.Namespace) -> None:
    resp = _op(args).unassign_worker(args.worker_id)
    was = f"left the pool of {resp.tenant_id}" if resp.tenant_id else "was in no pool"
    print(f"{resp.worker_id} is shared ({was})")


def cmd_worker_drain(args: argparse.Namespace) -> None:
    _op(args).drain(args.worker_id, draining=args.drain)
    print(f"{args.worker_id} {'draining' if args.drain else 'undrained'}")


def cmd_adapter_load(args: argparse.Namespace) -> None:
    _show(_op(args).force_load(args.adapter_id, args.worker or ""))


def cmd_adapter_prefetch(args: argparse.Namespace) -> None:
    print("in the node caches of:", " ".join(_op(args).prefetch(args.adapter_id, args.worker)) or "(none)")


def cmd_adapter_evict(args: argparse.Namespace) -> None:
    print("evicted from:", " ".join(_op(args).force_evict(args.adapter_id, args.worker or "")) or "(nowhere)")


def cmd_routing(args: argparse.Namespace) -> None:
    _show(_op(args).routing_table())


def cmd_make_adapter(args: argparse.Namespace) -> None:
    from loraplane import devadapter, tinymodel

    base = tinymodel.build(_data_dir(args) / "models" / "tiny-llama")
    out = devadapter.train(base, Path(args.out), args.phrase, rank=args.rank)
    print(f"wrote {out / 'adapter_model.safetensors'} (answers every prompt with {args.phrase!r})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraplane")
    parser.add_argument("--data-dir", help="the embedded stack's directory (default .loraplane)")
    sub = parser.add_subparsers(required=True)
    up = sub.add_parser("up", help="run the whole stack on this machine")
    up.add_argument(
        "--workers", type=_positive, default=1, metavar="N",
        help="vLLM workers of tiny-llama (default 1): their vLLMs on ports 8100, 8101, …",
    )  # fmt: skip
    up.set_defaults(func=cmd_up)
    tenantcli.add_commands(sub)
    tenant = sub.add_parser("tenant", help="tenants (operator)").add_subparsers(required=True)
    create = _verb(tenant, "create", cmd_tenant_create, "create a tenant and print its API key", "name")
    create.add_argument("--tier", choices=sorted(TIERS), default="shared")
    create.add_argument("--json", action="store_true", help="print JSON")
    _verb(tenant, "list", cmd_tenant_list, "list tenants")
    _verb(tenant, "set-tier", cmd_tenant_set_tier, "change a tenant's tier", "tenant_id").add_argument(
        "tier", choices=sorted(TIERS)
    )
    _verb(tenant, "suspend", cmd_tenant_suspend, "suspend a tenant (its keys stop working)", "tenant_id").set_defaults(
        suspend=True
    )
    _verb(tenant, "unsuspend", cmd_tenant_suspend, "lift a suspension", "tenant_id").set_defaults(suspend=False)
    limits = _verb(tenant, "set-limits", cmd_tenant_set_limits, "set a tenant's own rate limits", "tenant_id")
    for flag, what in (("--rpm", "requests per minute"), ("--tpm", "tokens per minute"),
                       ("--concurrency", "requests in flight at once")):  # fmt: skip
        limits.add_argument(flag, type=_count, metavar="N", help=f"{what}, 0: unlimited (default: as now)")
    limits.add_argument("--tier-default", action="store_true", help="drop the tenant's own limits: its tier's apply")
    capacity = _verb(
        tenant, "set-capacity", cmd_tenant_set_capacity, "set a tenant's pinned-adapter allowance and spill-over",
        "tenant_id",
    )  # fmt: skip
    capacity.add_argument("--pinned-slots", type=_count, metavar="N", help="adapters it may pin (default: as now)")
    capacity.add_argument(
        "--tier-default-pins", action="store_true", help="drop the tenant's own allowance: its tier's applies"
    )
    capacity.add_argument(
        "--spill-over", action=argparse.BooleanOptionalAction,
        help="whether its requests may go to shared workers when its dedicated pool cannot take them "
        "(default: as now)",
    )  # fmt: skip
    usage = _verb(tenant, "usage", cmd_tenant_usage, "a tenant's token usage per model and adapter", "tenant_id")
    usagereport.add_arguments(usage)
    key = sub.add_parser("key", help="API keys (operator)").add_subparsers(required=True)
    _verb(key, "create", cmd_key_create, "issue another key for a tenant", "tenant_id")
    _verb(key, "list", cmd_key_list, "list a tenant's keys by prefix", "tenant_id")
    _verb(key, "revoke", cmd_key_revoke, "revoke a key by its prefix", "prefix")
    worker = sub.add_parser("worker", help="workers (operator)").add_subparsers(required=True)
    _verb(worker, "list", cmd_worker_list, "list workers and what they hold").add_argument(
        "--json", action="store_true", help="print JSON"
    )
    assign = _verb(worker, "assign", cmd_worker_assign, "put a worker in a dedicated tenant's pool", "worker_id")
    assign.add_argument("tenant_id")
    _verb(worker, "unassign", cmd_worker_unassign, "make a pool's worker a shared one again", "worker_id")
    _verb(worker, "drain", cmd_worker_drain, "no new placements on a worker", "worker_id").set_defaults(drain=True)
    _verb(worker, "undrain", cmd_worker_drain, "let a worker take placements", "worker_id").set_defaults(drain=False)
    adapter = sub.add_parser("adapter", help="placements (operator)").add_subparsers(required=True)
    _verb(adapter, "load", cmd_adapter_load, "load an adapter now", "adapter_id").add_argument("--worker")
    _verb(adapter, "evict", cmd_adapter_evict, "evict an adapter now", "adapter_id").add_argument("--worker")
    _verb(
        adapter, "prefetch", cmd_adapter_prefetch, "fetch an adapter's bytes into node caches", "adapter_id"
    ).add_argument(
        "--worker", action="append", help="a worker (again for more); none: those a placement would pick next"
    )
    _verb(sub, "routing", cmd_routing, "print the routing table")
    make = sub.add_parser("make-adapter", help="train a small demo adapter for tiny-llama on the CPU")
    make.add_argument("out", help="output directory")
    make.add_argument("--phrase", default="red apple river", help="what the adapter makes the model say")
    make.add_argument("--rank", type=int, default=8)
    make.set_defaults(func=cmd_make_adapter)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except grpc.RpcError as err:
        print(f"error: {err.details()}", file=sys.stderr)
        return 1
    except tenantcli.CliError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _verb(
    group: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    func: Callable[[argparse.Namespace], object],
    help: str,
    *positional: str,
) -> argparse.ArgumentParser:
    parser = group.add_parser(name, help=help)
    for arg in positional:
        parser.add_argument(arg)
    parser.set_defaults(func=func)
    return parser


if __name__ == "__main__":
    sys.exit(main())
