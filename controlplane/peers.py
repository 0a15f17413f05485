"""Calls to the other control plane replicas. A worker's commands go through the replica
that holds its agent's stream (its `owner`); the others forward placements there, with the
replicas' own credential (the peer token) and the `lp-forwarded` marker: a forwarded call is
never forwarded again, and the peer token opens only the forwarded verbs (`Auth.peer`)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane.errors import NoCapacity
from controlplane.placement import Placement
from loraplane import logs
from loraplane.controlplane.v1 import admin_pb2 as adpb
from loraplane.controlplane.v1 import admin_pb2_grpc

FORWARDED = "lp-forwarded"


class Peers:
    def __init__(self, peer_token: str, timeout_s: float) -> None:
        self._metadata = (("authorization", f"Bearer {peer_token}"), (FORWARDED, "1"))
        self._timeout = timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, addr: str) -> grpc.aio.Channel:
        if addr not in self._channels:
            self._channels[addr] = grpc.aio.insecure_channel(addr)
        return self._channels[addr]

    def _stub(self, addr: str) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(self._channel(addr))

    async def alive(self, addr: str, timeout_s: float = 2.0) -> bool:
        """Whether the replica at `addr` answers its health check."""
        try:
            health = health_pb2_grpc.HealthStub(self._channel(addr))
            await health.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return True

    async def load(self, addr: str, adapter_id: str, worker_id: str) -> Placement:
        try:
            resp: adpb.ForceLoadAdapterResponse = await self._stub(addr).ForceLoadAdapter(
                adpb.ForceLoadAdapterRequest(adapter_id=adapter_id, worker_id=worker_id),
                metadata=(*self._metadata, *logs.metadata()),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise NoCapacity(err.details() or f"placing on worker {worker_id} failed") from None
        return Placement(resp.worker_id, resp.already_loaded)  # the owner does not say how long it took

    async def evict(self, addr: str, adapter_id: str, worker_id: str) -> list[str]:
        try:
            resp: adpb.ForceEvictAdapterResponse = await self._stub(addr).ForceEvictAdapter(
                adpb.ForceEvictAdapterRequest(adapter_id=adapter_id, worker_id=worker_id),
                metadata=(*self._metadata, *logs.metadata()),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise NoCapacity(f"evicting from worker {worker_id} failed: {err.details()}") from None
        return list(resp.worker_ids)

    async def prefetch(self, addr: str, adapter_id: str, worker_id: str) -> list[str]:
        try:
            resp: adpb.PrefetchAdapterResponse = await self._stub(addr).PrefetchAdapter(
                adpb.PrefetchAdapterRequest(adapter_id=adapter_id, worker_ids=[worker_id]),
                metadata=(*self._metadata, *logs.metadata()),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise NoCapacity(f"prefetching onto worker {worker_id} failed: {err.details()}") from None
        return list(resp.worker_ids)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


def forwarded(metadata: object) -> bool:
    return any(k == FORWARDED for k, _ in metadata or ())  # type: ignore[attr-defined]
