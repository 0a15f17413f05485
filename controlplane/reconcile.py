"""Desired state: each connected worker is brought to hold what Redis says it should
(`desired:<worker id>`), level-triggered, by the replica that holds its agent's stream."""

from __future__ import annotations

import asyncio
import logging

from controlplane.errors import NoCapacity
from controlplane.sessions import AgentSession, Sessions
from controlplane.store import Store

log = logging.getLogger(__name__)
MAX_RELOAD_FAILURES = 3


class Reconciler:
    def __init__(self, store: Store, sessions: Sessions) -> None:
        self._store = store
        self._sessions = sessions

    def converge(self, session: AgentSession) -> None:
        """Start a reconcile of the worker unless one is running (called on register, and after
        every heartbeat that differs from the desired state: `converge_if_drifted`)."""
        if session.reconciling is None or session.reconciling.done():
            session.reconciling = asyncio.create_task(self._reconcile(session))

    async def converge_if_drifted(self, session: AgentSession) -> None:
        """After a heartbeat: converge a healthy worker whose resident set is not its desired one."""
        record = session.record
        if record.healthy and set(record.resident) != await self._store.desired(record.id):
            self.converge(session)

    async def _reconcile(self, session: AgentSession) -> None:
        """Load what the worker should hold and does not (a restarted vLLM); evict what it holds
        and should not (deleted while it was away, or another tenant's on a worker now in a
        dedicated pool). An adapter with no record is left alone: Redis may have lost it, and
        LRU eviction reclaims the slot when it is needed."""
        wid = session.record.id
        desired = await self._store.desired(wid)
        resident = set(session.record.resident)
        pool = (await self._store.pools()).get(wid, "")
        for adapter_id in sorted(desired - resident - session.loading):
            rec = await self._store.get_adapter(adapter_id)
            if rec is None or rec.status != "ready" or pool not in ("", rec.tenant_id):
                await self._store.desire(wid, adapter_id, wanted=False)
                continue
            session.loading.add(adapter_id)  # a placement meanwhile counts the slot as taken
            try:
                await self._sessions.load(session, rec, keep_intent=True)
                session.failures.pop(adapter_id, None)
            except NoCapacity as err:
                session.failures[adapter_id] = failures = session.failures.get(adapter_id, 0) + 1
                log.warning("reloading %s on %s failed (%d): %s", adapter_id, wid, failures, err)
                if failures >= MAX_RELOAD_FAILURES:
                    await self._store.desire(wid, adapter_id, wanted=False)
            finally:
                session.loading.discard(adapter_id)
        for adapter_id in sorted(resident - session.loading - session.busy):
            rec = await self._store.get_adapter(adapter_id)
            if rec is None:
                continue
            if pool not in ("", rec.tenant_id):  # another tenant's, on a dedicated worker: it goes
                desired.discard(adapter_id)
            if adapter_id in desired:
                continue
            try:
                await self._sessions.evict(session, adapter_id)
            except NoCapacity as err:
                log.warning("evicting stale %s from %s failed: %s", adapter_id, wid, err)
