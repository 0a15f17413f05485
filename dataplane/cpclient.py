"""The data plane's calls to the control plane, with the user's own credential."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dataplane.errors import from_grpc
from loraplane import logs
from loraplane.controlplane.v1 import adapter_pb2 as apb
from loraplane.controlplane.v1 import adapter_pb2_grpc

SERVICE_CONFIG = """{
  "methodConfig": [{
    "name": [{"service": "loraplane.controlplane.v1.AdapterService", "method": "ListAdapters"},
             {"service": "loraplane.controlplane.v1.AdapterService", "method": "GetAdapter"},
             {"service": "loraplane.controlplane.v1.AdapterService", "method": "PlaceAdapter"}],
    "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.1s", "maxBackoff": "1s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
  }]
}"""


class ControlPlaneClient:
    def __init__(self, addr: str) -> None:
        self.channel = grpc.aio.insecure_channel(
            addr,
            options=[
                ("grpc.service_config", SERVICE_CONFIG),
                ("grpc.enable_retries", 1),
                ("grpc.max_send_message_length", 4 << 20),
            ],
        )
        self.adapters = adapter_pb2_grpc.AdapterServiceStub(self.channel)

    @staticmethod
    def auth(key: str) -> tuple[tuple[str, str], ...]:
        """The user's credential, and the request id of the request being served."""
        return (("authorization", f"Bearer {key}"), *logs.metadata())

    async def list_adapters(self, key: str) -> list[apb.Adapter]:
        try:
            resp: apb.ListAdaptersResponse = await self.adapters.ListAdapters(
                apb.ListAdaptersRequest(), metadata=self.auth(key), timeout=10
            )
        except grpc.aio.AioRpcError as err:
            raise from_grpc(err) from None
        return list(resp.adapters)

    async def create_adapter(self, key: str, request: apb.CreateAdapterRequest) -> apb.Adapter:
        try:
            resp: apb.CreateAdapterResponse = await self.adapters.CreateAdapter(
                request, metadata=self.auth(key), timeout=30
            )
        except grpc.aio.AioRpcError as err:
            raise from_grpc(err) from None
        return resp.adapter

    async def delete_adapter(self, key: str, adapter_id: str) -> None:
        try:
            await self.adapters.DeleteAdapter(
                apb.DeleteAdapterRequest(id=adapter_id), metadata=self.auth(key), timeout=30
            )
        except grpc.aio.AioRpcError as err:
            raise from_grpc(err) from None

    async def get_adapter(self, key: str, adapter_id: str) -> apb.Adapter:
        try:
            resp: apb.GetAdapterResponse = await self.adapters.GetAdapter(
                apb.GetAdapterRequest(id=adapter_id), metadata=self.auth(key), timeout=10
            )
        except grpc.aio.AioRpcError as err:
            raise from_grpc(err) from None
        return resp.adapter

    async def pin(self, key: str, adapter_id: str, timeout: float) -> apb.PinAdapterResponse:
        """Pinned and loaded (the call waits for the load)."""
        try:
            resp: apb.PinAdapterResponse = await self.adapters.PinAdapter(
                apb.PinAdapterRequest(id=adapter_id), metadata=self.auth(key), timeout=timeout
            )
        except grpc.aio.AioRpcError as err:
            raise from_grpc(err) from None
        return resp

    async def unpin(self, key: str, adapter_id: str) -> apb.Adapter:
        try:
            resp: apb.UnpinAdapterResponse = await self.adapters.UnpinAdapter(
                apb.UnpinAdapterRequest(id=adapter_id), metadata=self.auth(key), timeout=10
            )
        except grpc.aio.AioRpcError as err:
            raise from_grpc(err) from None
        return resp.adapter

    async def place(
        self, key: str, adapter_id: str, timeout: float, replicate: bool = False, avoid: list[str] | None = None
    ) -> apb.PlaceAdapterResponse:
        request = apb.PlaceAdapterRequest(adapter_id=adapter_id, replicate=replicate, avoid_worker_ids=avoid or [])
        try:
            resp: apb.PlaceAdapterResponse = await self.adapters.PlaceAdapter(
                request, metadata=self.auth(key), timeout=timeout
            )
            return resp
        except grpc.aio.AioRpcError as err:
            raise from_grpc(err) from None

    async def close(self) -> None:
        await self.channel.close()


async def answering(addrs: set[str], timeout_s: float = 2.0) -> set[str]:
    """The control plane replicas among `addrs` that answer their health check (asked at once)."""

    async def answers(addr: str) -> bool:
        async with grpc.aio.insecure_channel(addr) as channel:
            try:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
            except grpc.aio.AioRpcError:
                return False
        return True

    ordered = sorted(addrs)
    return {a for a, up in zip(ordered, await asyncio.gather(*map(answers, ordered)), strict=True) if up}
