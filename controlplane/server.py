"""Builds and runs the control plane's gRPC server (health and reflection included)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import redis.asyncio as redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controlplane import telemetry
from controlplane.admin import AdminService, TenantService
from controlplane.artifacts import ArtifactStore, FileArtifactStore
from controlplane.liveness import Liveness
from controlplane.peers import Peers
from controlplane.placer import Placer
from controlplane.reconcile import Reconciler
from controlplane.registry import Registry
from controlplane.s3store import S3ArtifactStore
from controlplane.service import AdapterService, Auth, WorkerService
from controlplane.sessions import Sessions
from controlplane.settings import Settings
from controlplane.store import Store
from loraplane import config, logs, metrics, nopickle
from loraplane.catalog import Catalog
from loraplane.controlplane.v1 import (
    adapter_pb2,
    adapter_pb2_grpc,
    admin_pb2,
    admin_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from loraplane.state import client as state_client

log = logging.getLogger(__name__)

SERVICE_NAMES = [
    adapter_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name,
    tenant_pb2.DESCRIPTOR.services_by_name["TenantService"].full_name,
    worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
]
MAX_MESSAGE = 4 << 20


@dataclass
class ControlPlane:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    redis: redis.Redis
    port: int
    registry: Registry
    sessions: Sessions
    maintenance: asyncio.Future[tuple[None, None, None]]
    peers: Peers
    artifacts: ArtifactStore
    metrics: asyncio.Server | None

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.sessions.settle()  # the agents' streams ended: their workers written out of routing
        if self.metrics is not None:
            self.metrics.close()
        self.maintenance.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.maintenance
        await self.registry.close()
        await self.peers.close()
        await self.redis.aclose()
        await asyncio.to_thread(self.artifacts.close)


def artifact_store(settings: Settings) -> ArtifactStore:
    if settings.artifact_s3 is not None:
        return S3ArtifactStore(settings.artifact_s3, settings.artifact_dir / "tmp")
    return FileArtifactStore(settings.artifact_dir)


async def start(settings: Settings) -> ControlPlane:
    client = state_client.connect(settings.redis_url, timeout_s=5)
    await client.ping()
    store = Store(client)
    artifacts = await asyncio.to_thread(artifact_store, settings)
    await asyncio.to_thread(artifacts.check)
    artifacts.clean_temp()
    catalog = Catalog.load(settings.catalog_path)
    peers = Peers(settings.peer_token, settings.load_timeout_s * 2)
    sessions = Sessions(store, settings.advertise_addr, settings.load_timeout_s, settings.max_loads_per_s)
    placer = Placer(store, sessions, peers, settings.placement_failed_hold_s)
    liveness = Liveness(store, sessions, peers)
    auth = Auth(store, settings)
    registry = Registry(settings, store, artifacts, catalog, placer, liveness)
    await liveness.check_epoch()
    # This replica holds no stream yet: a worker recorded as held by it is held by its previous life.
    await liveness.release_stale()

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
    )
    adapter_pb2_grpc.add_AdapterServiceServicer_to_server(
        AdapterService(settings, store, registry, placer, auth), server
    )
    tenant_pb2_grpc.add_TenantServiceServicer_to_server(TenantService(settings, store, auth), server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(
        AdminService(store, placer, auth, settings.prefetch_workers), server
    )
    worker = WorkerService(store, artifacts, sessions, Reconciler(store, sessions), auth)
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(worker, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(settings.grpc_addr)
    if port == 0:
        raise OSError(f"cannot listen on {settings.grpc_addr}")
    await server.start()
    for name in ["", *SERVICE_NAMES]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("control plane listening on %s", settings.grpc_addr)
    maintenance = asyncio.gather(
        _kept("registry maintenance", registry.maintain),
        _kept("the liveness watch", lambda: liveness.watch(settings.heartbeat_timeout_s)),
        _kept("the pin keeper", placer.keep_pinned),
    )
    metrics_server = await metrics.serve(telemetry.REGISTRY, settings.metrics_addr)
    return ControlPlane(
        server, health_servicer, client, port, registry, sessions, maintenance, peers, artifacts, metrics_server
    )


async def _kept(name: str, loop: Callable[[], Awaitable[None]], pause_s: float = 1.0) -> None:
    """Run a background loop for ever: one that stops on an error nobody expected is logged with
    its traceback and started again, never left dead in silence (a dead liveness watch keeps a
    lost worker in routing)."""
    while True:
        try:
            await loop()
        except Exception:
            log.exception("%s stopped on an unexpected error; starting it again", name)
            await asyncio.sleep(pause_s)


async def serve(settings: Settings) -> None:
    cp = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await cp.stop()


def main() -> None:
    nopickle.install()
    logs.setup("controlplane")
    asyncio.run(serve(config.or_exit(lambda: Settings.from_env(os.environ))))


if __name__ == "__main__":
    main()
