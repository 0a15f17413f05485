"""The adapter registry: every way an adapter comes to be, and goes."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any

import redis.asyncio as redis

from controlplane import hub, validation
from controlplane.artifacts import ArtifactStore, PendingArtifact
from controlplane.errors import BadRequest, ControlPlaneError, NotFound
from controlplane.keys import new_id
from controlplane.liveness import Liveness
from controlplane.placer import Placer
from controlplane.settings import Settings
from controlplane.store import Store
from loraplane.catalog import BaseModel, Catalog
from loraplane.limits import NAME
from loraplane.state.records import AdapterRecord, Tenant

log = logging.getLogger(__name__)

REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")


class Registry:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        artifacts: ArtifactStore,
        catalog: Catalog,
        placer: Placer,
        liveness: Liveness,
    ) -> None:
        self._s = settings
        self._store = store
        self._artifacts = artifacts
        self._catalog = catalog
        self._placer = placer
        self._liveness = liveness
        self._tasks: set[asyncio.Task[None]] = set()
        self._retiring: set[str] = set()

    def base_model(self, name: str, base_model: str) -> BaseModel:
        """Checks a new adapter's name and base model before any byte is read."""
        if not NAME.match(name):
            raise BadRequest("name must be 1-64 of A-Z a-z 0-9 . _ - and start with a letter or digit")
        model = self._catalog.get(base_model)
        if model is None:
            raise NotFound(f"base model {base_model!r} does not exist")
        if not model.lora or model.architecture is None:
            raise BadRequest(f"base model {base_model!r} does not support LoRA adapters")
        return model

    def open_temp(self) -> PendingArtifact:
        return self._artifacts.open_temp()

    def max_bytes(self, tenant: Tenant) -> int:
        return min(self._s.max_adapter_bytes, self._s.tier_max_bytes[tenant.tier])

    def _validated(
        self,
        rec: AdapterRecord,
        pending: PendingArtifact,
        config: bytes | None,
        lora_alpha: float | None,
    ) -> AdapterRecord:
        """The record, ready, once the bytes pass every check (blocking: run in a thread)."""
        model = self.base_model(rec.name, rec.base_model)
        pending.file.flush()
        pending.file.seek(0)
        found = validation.validate(pending.file, pending.size, model, config, lora_alpha, self._catalog)
        return replace(
            rec,
            status="ready",
            rank=found.info.rank,
            target_modules=list(found.info.target_modules),
            lora_alpha=found.lora_alpha,
            size_bytes=pending.size,
            sha256=pending.sha256,
            adapter_config=found.clean_config.decode(),
        )

    def _new(self, tenant: Tenant, name: str, base_model: str, source: dict[str, str]) -> AdapterRecord:
        return AdapterRecord(
            id=new_id("adp"), tenant_id=tenant.id, name=name, base_model=base_model, status="pending",
            status_reason="", source=source, rank=0, target_modules=[], lora_alpha=0.0, size_bytes=0,
            sha256="", created_at=time.time(), adapter_config="",
        )  # fmt: skip

    async def store_upload(
        self, tenant: Tenant, name: str, base_model: str, pending: PendingArtifact, config: bytes, alpha: float | None
    ) -> AdapterRecord:
        """Validate, fsync, commit: the adapter exists only once all three are done."""
        rec = self._new(tenant, name, base_model, {"kind": "upload"})
        rec = await asyncio.to_thread(self._validated, rec, pending, config or None, alpha)
        sha, created = await asyncio.to_thread(pending.commit)
        try:
            await self._store.create_adapter(rec, self._s.tier_limits[tenant.tier])
        except ControlPlaneError:
            if created and not await self._store.blob_referenced(sha):
                self._artifacts.delete(sha)
            raise
        log.info("tenant %s stored adapter %s (%d bytes)", tenant.id, rec.id, rec.size_bytes)
        self._prefetch(rec)
        return rec

    async def register_hub(
        self, tenant: Tenant, name: str, base_model: str, repo: str, revision: str, token: str
    ) -> AdapterRecord:
        """Take the name and a quota slot now; fetch and validate in the background."""
        self.base_model(name, base_model)
        if not REPO.match(repo) or ".." in repo:
            raise BadRequest("repo must be 'owner/name'")
        revision = revision or "main"
        if not REVISION.match(revision) or ".." in revision:
            raise BadRequest("revision must be a branch, tag or commit")
        rec = self._new(tenant, name, base_model, {"kind": "huggingface", "repo": repo, "revision": revision})
        await self._store.create_adapter(rec, self._s.tier_limits[tenant.tier])
        self._spawn(self._fetch(rec, token, self.max_bytes(tenant)))
        return rec

    async def _fetch(self, rec: AdapterRecord, token: str, max_bytes: int) -> None:
        source = rec.source
        pending: PendingArtifact | None = None
        try:
            fetched = await asyncio.wait_for(
                asyncio.to_thread(
                    hub.fetch,
                    self._s.hf_endpoint,
                    source["repo"],
                    source["revision"],
                    token,
                    self._artifacts,
                    max_bytes,
                    self._s.hub_timeout_s,
                ),  # fmt: skip
                self._s.hub_total_timeout_s,
            )
            pending = fetched.pending
            rec = replace(rec, source=dict(source, commit_sha=fetched.commit_sha))
            ready = await asyncio.to_thread(self._validated, rec, pending, fetched.config, None)
            sha, created = await asyncio.to_thread(pending.commit)
            if not await self._store.complete_adapter(ready):
                if created and not await self._store.blob_referenced(sha):
                    self._artifacts.delete(sha)
                return
            log.info("adapter %s ready from %s@%s", rec.id, source["repo"], fetched.commit_sha)
            self._prefetch(ready)
        except (ControlPlaneError, hub.HubError) as err:
            await self._store.fail_adapter(rec.id, str(err))
        except TimeoutError:
            await self._store.fail_adapter(rec.id, "the download from the hub took too long")
        except OSError as err:
            log.warning("adapter %s: %s", rec.id, err)
            await self._store.fail_adapter(rec.id, "the download could not be stored; try again")
        finally:
            if pending is not None:
                pending.discard()

    def _prefetch(self, rec: AdapterRecord) -> None:
        """A ready adapter's bytes, pushed ahead of its first request into the node caches of the
        workers likely to load it (in the background: the upload's answer does not wait)."""
        if self._s.prefetch_workers > 0:
            self._spawn(self._prefetch_quietly(rec))

    async def _prefetch_quietly(self, rec: AdapterRecord) -> None:
        try:
            await self._placer.prefetch(rec, self._s.prefetch_workers)
        except (redis.RedisError, ControlPlaneError) as err:  # a cache warmed later, by the first load
            log.info("prefetching %s: %s", rec.id, err)

    async def delete(self, rec: AdapterRecord) -> None:
        """Gone for the tenant now; evicted and garbage-collected in the background."""
        await self._store.mark_deleting(rec)
        self._spawn(self._retire(rec))

    async def _retire(self, rec: AdapterRecord) -> None:
        self._retiring.add(rec.id)
        try:
            await self._placer.evict_everywhere(rec.id)
            if await self._store.finish_delete(rec):
                self._artifacts.delete(rec.sha256)
            log.info("adapter %s deleted", rec.id)
        finally:
            self._retiring.discard(rec.id)

    async def maintain(self, every_s: float = 30.0) -> None:
        """Finish deletions a stopped replica left; fail downloads that cannot still be running
        (a replica that stopped mid-download; tokens are never stored, so they cannot resume)."""
        swept = time.monotonic()
        while True:
            try:
                if time.monotonic() - swept > self._s.orphan_sweep_s and self._liveness.redis_trusted:
                    await self._sweep_orphans()
                    swept = time.monotonic()
                for rec in await self._store.deleting():
                    if rec.id not in self._retiring:
                        self._spawn(self._retire(rec))
                for rec in await self._store.pending():
                    if time.time() - rec.created_at > self._s.hub_total_timeout_s + every_s:
                        await self._store.fail_adapter(rec.id, "the download was interrupted; register it again")
            except (redis.RedisError, ControlPlaneError) as err:  # Redis or the store is away: next round
                log.warning("registry maintenance: %s", err)
            await asyncio.sleep(min(every_s, self._s.orphan_sweep_s))

    async def _sweep_orphans(self) -> None:
        """Delete blobs no adapter names, past a grace period: the bytes of an upload whose
        record never got written (Redis failed between the two). Young blobs are left alone:
        their record may be on its way. Never after Redis was seen empty (see Liveness)."""
        for sha in await asyncio.to_thread(lambda: list(self._artifacts.blobs(self._s.orphan_grace_s))):
            if not await self._store.blob_referenced(sha):
                await self._liveness.check_epoch()  # an empty Redis references nothing: asked each time
                if not self._liveness.redis_trusted:
                    return
                log.info("deleting orphan blob %s", sha)
                self._artifacts.delete(sha)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
