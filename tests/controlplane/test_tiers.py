"""Tiers that mean capacity (issue 18), against a real stack whose three tiny-llama workers are
vLLM simulators with two LoRA slots each: dedicated pools (AssignWorker / UnassignWorker,
spill-over, a pool that is down) and pinned adapters (PinAdapter / UnpinAdapter, allowances,
eviction pressure, a lost worker).

The tests share one stack; each leaves it whole again (every worker shared and serving, its
tenants' adapters deleted)."""

from __future__ import annotations

import random
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import redis

from loraplane import tinymodel
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
from loraplane.stack import BASE_MODEL, Stack, WorkerSpec
from loraplane.state import keys
from tests.conftest import grpc_upload, running_stack
from tests.support import lora_tensors, safetensors_bytes, start_simulator, wait_for

SLOTS = 2  # LoRA slots per worker (the simulators' --max-loras, and the catalog's)
WORKERS = [f"embedded-{BASE_MODEL}", f"embedded-{BASE_MODEL}-2", f"embedded-{BASE_MODEL}-3"]  # sim i's worker
ADAPTER = safetensors_bytes(lora_tensors(rank=2))
TIMEOUT_S = 30


@dataclass(frozen=True)
class Tenant:
    id: str
    key: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.key}"),)


@dataclass
class TierStack:
    stack: Stack
    sims: list[subprocess.Popen[bytes]]
    sim_ports: list[int]
    channel: grpc.Channel
    tenants: list[Tenant] = field(default_factory=list)  # made by the running test

    def __post_init__(self) -> None:
        self.operator = (("authorization", f"Bearer {self.stack.secrets['operator_token']}"),)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.tenant_service = tenant_pb2_grpc.TenantServiceStub(self.channel)
        self.adapters = adapter_pb2_grpc.AdapterServiceStub(self.channel)
        self.worker_service = worker_pb2_grpc.WorkerServiceStub(self.channel)

    # operator verbs

    def tenant(self, name: str, tier: tenant_pb2.Tier) -> Tenant:
        resp = self.tenant_service.CreateTenant(
            tenant_pb2.CreateTenantRequest(name=name, tier=tier), metadata=self.operator, timeout=TIMEOUT_S
        )
        made = Tenant(resp.tenant.id, resp.api_key)
        self.tenants.append(made)
        return made

    def describe(self, tenant: Tenant) -> tenant_pb2.Tenant:
        resp = self.tenant_service.ListTenants(tenant_pb2.ListTenantsRequest(), metadata=self.operator, timeout=10)
        found: tenant_pb2.Tenant = next(t for t in resp.tenants if t.id == tenant.id)
        return found

    def set_tier(self, tenant: Tenant, tier: tenant_pb2.Tier) -> tenant_pb2.Tenant:
        request = tenant_pb2.SetTenantTierRequest(tenant_id=tenant.id, tier=tier)
        resp: tenant_pb2.SetTenantTierResponse = self.tenant_service.SetTenantTier(
            request, metadata=self.operator, timeout=10
        )
        return resp.tenant

    def set_capacity(self, tenant: Tenant, **fields: Any) -> tenant_pb2.Tenant:
        request = tenant_pb2.SetTenantCapacityRequest(tenant_id=tenant.id, **fields)
        resp: tenant_pb2.SetTenantCapacityResponse = self.tenant_service.SetTenantCapacity(
            request, metadata=self.operator, timeout=10
        )
        return resp.tenant

    def assign(self, worker_id: str, tenant: Tenant) -> admin_pb2.AssignWorkerResponse:
        request = admin_pb2.AssignWorkerRequest(worker_id=worker_id, tenant_id=tenant.id)
        resp: admin_pb2.AssignWorkerResponse = self.admin.AssignWorker(
            request, metadata=self.operator, timeout=TIMEOUT_S
        )
        return resp

    def unassign(self, worker_id: str) -> admin_pb2.UnassignWorkerResponse:
        request = admin_pb2.UnassignWorkerRequest(worker_id=worker_id)
        resp: admin_pb2.UnassignWorkerResponse = self.admin.UnassignWorker(
            request, metadata=self.operator, timeout=TIMEOUT_S
        )
        return resp

    def force_load(self, adapter_id: str, worker_id: str) -> admin_pb2.ForceLoadAdapterResponse:
        request = admin_pb2.ForceLoadAdapterRequest(adapter_id=adapter_id, worker_id=worker_id)
        resp: admin_pb2.ForceLoadAdapterResponse = self.admin.ForceLoadAdapter(
            request, metadata=self.operator, timeout=TIMEOUT_S
        )
        return resp

    def workers(self) -> dict[str, worker_pb2.Worker]:
        resp = self.worker_service.ListWorkers(worker_pb2.ListWorkersRequest(), metadata=self.operator, timeout=10)
        return {w.worker_id: w for w in resp.workers}

    def holders(self, adapter_id: str) -> set[str]:
        """The serving workers that hold the adapter."""
        return {wid for wid, w in self.workers().items() if w.healthy and adapter_id in w.resident_adapter_ids}

    # tenant verbs

    def upload(self, tenant: Tenant, name: str) -> str:
        return grpc_upload(self.stack.grpc_addr, tenant.key, name, ADAPTER).id

    def place(self, tenant: Tenant, adapter_id: str) -> adapter_pb2.PlaceAdapterResponse:
        resp: adapter_pb2.PlaceAdapterResponse = self.adapters.PlaceAdapter(
            adapter_pb2.PlaceAdapterRequest(adapter_id=adapter_id), metadata=tenant.metadata, timeout=TIMEOUT_S
        )
        return resp

    def pin(self, tenant: Tenant, adapter_id: str) -> adapter_pb2.PinAdapterResponse:
        resp: adapter_pb2.PinAdapterResponse = self.adapters.PinAdapter(
            adapter_pb2.PinAdapterRequest(id=adapter_id), metadata=tenant.metadata, timeout=TIMEOUT_S
        )
        return resp

    def unpin(self, tenant: Tenant, adapter_id: str) -> None:
        self.adapters.UnpinAdapter(adapter_pb2.UnpinAdapterRequest(id=adapter_id), metadata=tenant.metadata, timeout=10)

    def delete(self, tenant: Tenant, adapter_id: str) -> None:
        self.adapters.DeleteAdapter(
            adapter_pb2.DeleteAdapterRequest(id=adapter_id), metadata=tenant.metadata, timeout=10
        )

    def own(self, tenant: Tenant) -> list[str]:
        resp = self.adapters.ListAdapters(adapter_pb2.ListAdaptersRequest(), metadata=tenant.metadata, timeout=10)
        return [a.id for a in resp.adapters]

    # the workers' engines

    def kill_sim(self, worker_id: str) -> None:
        i = WORKERS.index(worker_id)
        self.sims[i].kill()
        self.sims[i].wait()
        wait_for(lambda: not self.workers()[worker_id].healthy, 15, f"{worker_id} is still reported serving")

    def restore(self) -> None:
        """Every engine up again and every worker serving."""
        for i, sim in enumerate(self.sims):
            if sim.poll() is not None:
                self.sims[i], _, _ = start_simulator(BASE_MODEL, "--max-loras", str(SLOTS), port=self.sim_ports[i])
        wait_for(lambda: all(w.healthy for w in self.workers().values()), 30, "the workers are not all serving")


@pytest.fixture(scope="module")
def tiers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TierStack]:
    tmp = tmp_path_factory.mktemp("tier-stack")
    # The stack's own catalog says 8 slots a worker: this one says what the simulators hold.
    model_dir = tinymodel.build(tmp / "data" / "models" / BASE_MODEL)
    catalog = tmp / "catalog.json"
    Catalog.write(catalog, [{"name": BASE_MODEL, "kind": "chat", "path": str(model_dir), "lora": True,
                             "max_rank": 64, "max_adapters_per_worker": SLOTS}])  # fmt: skip
    sims: list[subprocess.Popen[bytes]] = []
    try:
        ports = []
        for _ in WORKERS:
            sim, _, port = start_simulator(BASE_MODEL, "--max-loras", str(SLOTS))
            sims.append(sim)
            ports.append(port)
        env = (
            ("LORAPLANE_VLLM_URL", f"http://127.0.0.1:{ports[0]}"),
            ("LORAPLANE_CATALOG", str(catalog)),
            ("LORAPLANE_HEARTBEAT_S", "0.5"),
        )
        extra = tuple(WorkerSpec(p, env=(("LORAPLANE_VLLM_URL", f"http://127.0.0.1:{p}"),)) for p in ports[1:])
        for stack in running_stack(tmp, with_worker=True, env=env, extra_workers=extra):
            with grpc.insecure_channel(stack.grpc_addr) as channel:
                yield TierStack(stack, sims, ports, channel)
    finally:
        for sim in sims:
            sim.kill()
            sim.wait()


@pytest.fixture
def ts(tiers: TierStack) -> Iterator[TierStack]:
    """The stack, left whole again after the test."""
    tiers.restore()
    try:
        yield tiers
    finally:
        tiers.restore()
        for wid in WORKERS:
            tiers.unassign(wid)
        gone = set()
        for t in tiers.tenants:
            for adapter_id in tiers.own(t):
                tiers.delete(t, adapter_id)
                gone.add(adapter_id)
        tiers.tenants.clear()
        wait_for(lambda: not any(gone & set(w.resident_adapter_ids) for w in tiers.workers().values()), 15,
                 "deleted adapters are still resident")  # fmt: skip


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str, str]:
    """The status a call fails with: code, details, and the HTTP status the data plane answers."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    err: Any = caught.value
    http = dict(err.trailing_metadata() or ()).get("lp-http-status", "")
    return err.code(), err.details(), http


# dedicated pools


def test_only_a_dedicated_tenant_gets_workers_and_keeps_its_tier_while_it_has_them(ts: TierStack) -> None:
    dedicated = ts.tenant("pool-owner", tenant_pb2.TIER_DEDICATED)
    reserved = ts.tenant("pool-wannabe", tenant_pb2.TIER_RESERVED)

    code, details, _ = code_of(lambda: ts.assign(WORKERS[0], reserved))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "dedicated" in details
    assert ts.workers()[WORKERS[0]].pool_tenant_id == ""
    assert code_of(lambda: ts.assign("no-such-worker", dedicated))[0] == grpc.StatusCode.NOT_FOUND

    assert ts.assign(WORKERS[0], dedicated).tenant_id == dedicated.id
    assert ts.describe(dedicated).pool_worker_ids == [WORKERS[0]]
    rival = ts.tenant("pool-rival", tenant_pb2.TIER_DEDICATED)
    code, details, _ = code_of(lambda: ts.assign(WORKERS[0], rival))  # never taken from another's pool
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "unassign" in details
    assert ts.workers()[WORKERS[0]].pool_tenant_id == dedicated.id
    code, details, _ = code_of(lambda: ts.set_tier(dedicated, tenant_pb2.TIER_RESERVED))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert WORKERS[0] in details
    assert ts.describe(dedicated).tier == tenant_pb2.TIER_DEDICATED

    assert ts.unassign(WORKERS[0]).tenant_id == dedicated.id
    assert ts.describe(dedicated).pool_worker_ids == []
    assert ts.set_tier(dedicated, tenant_pb2.TIER_RESERVED).tier == tenant_pb2.TIER_RESERVED


def test_assigning_a_worker_evicts_the_other_tenants_adapters_and_never_loads_them_back(ts: TierStack) -> None:
    owner = ts.tenant("evicting-owner", tenant_pb2.TIER_DEDICATED)
    other = ts.tenant("evicted-other", tenant_pb2.TIER_RESERVED)
    mine, theirs = ts.upload(owner, "mine"), ts.upload(other, "theirs")
    pool = WORKERS[0]
    ts.force_load(mine, pool)
    ts.force_load(theirs, pool)
    assert set(ts.workers()[pool].resident_adapter_ids) == {mine, theirs}

    assigned = ts.assign(pool, owner)
    assert list(assigned.evicted_adapter_ids) == [theirs]
    worker = ts.workers()[pool]
    assert (worker.pool_tenant_id, list(worker.resident_adapter_ids)) == (owner.id, [mine])
    routing = ts.admin.GetRoutingTable(admin_pb2.GetRoutingTableRequest(), metadata=ts.operator, timeout=10)
    assert {w.worker_id: w.pool_tenant_id for w in routing.workers}[pool] == owner.id

    # An operator cannot put it back; a placement puts it on a shared worker.
    code, details, _ = code_of(lambda: ts.force_load(theirs, pool))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert owner.id in details
    assert ts.place(other, theirs).worker_id != pool

    # The worker's engine restarts empty: its agent brings back what it should hold, only that.
    ts.kill_sim(pool)
    ts.restore()
    wait_for(lambda: mine in ts.workers()[pool].resident_adapter_ids, 15, "the owner's adapter was not reloaded")
    assert list(ts.workers()[pool].resident_adapter_ids) == [mine]


def test_a_pooled_worker_converges_to_its_tenants_adapters_alone(ts: TierStack) -> None:
    """An assign cut short (its replica died once the pool was recorded, before evicting; a
    placement decided before it went on): the worker's agent converges it all the same."""
    owner = ts.tenant("converging-owner", tenant_pb2.TIER_DEDICATED)
    other = ts.tenant("converging-other", tenant_pb2.TIER_RESERVED)
    mine, theirs = ts.upload(owner, "mine"), ts.upload(other, "theirs")
    pool = WORKERS[0]
    ts.force_load(mine, pool)
    ts.force_load(theirs, pool)
    r = redis.Redis.from_url(ts.stack.redis_url, decode_responses=True)
    try:
        r.hset(keys.POOLS, pool, owner.id)
        r.sadd(keys.desired(pool), "adp_gone")  # a drift: the next heartbeat has the worker reconciled
        wait_for(lambda: theirs not in ts.workers()[pool].resident_adapter_ids, 15, "the stranger was not evicted")
        assert list(ts.workers()[pool].resident_adapter_ids) == [mine]

        r.sadd(keys.desired(pool), theirs)  # placed there by a decision made before the pool
        ts.kill_sim(pool)
        ts.restore()
        wait_for(lambda: mine in ts.workers()[pool].resident_adapter_ids, 15, "the owner's adapter was not reloaded")
        wait_for(lambda: theirs not in r.smembers(keys.desired(pool)), 15, "the stranger is still desired there")
        assert list(ts.workers()[pool].resident_adapter_ids) == [mine]
    finally:
        r.close()


def test_pools_hold_their_tenants_adapters_and_no_one_elses(ts: TierStack) -> None:
    """Random placements of many tenants' adapters, from a few threads at once, with more
    adapters than slots in the pool and on the shared workers: every placement and every
    snapshot of the workers keeps to the pools."""
    rng = random.Random(18)
    owner = ts.tenant("random-owner", tenant_pb2.TIER_DEDICATED)
    others = [
        ts.tenant("random-dedicated-unpooled", tenant_pb2.TIER_DEDICATED),
        ts.tenant("random-reserved-1", tenant_pb2.TIER_RESERVED),
        ts.tenant("random-reserved-2", tenant_pb2.TIER_RESERVED),
        ts.tenant("random-shared", tenant_pb2.TIER_SHARED),
    ]
    pool = WORKERS[0]
    ts.assign(pool, owner)
    owned = [(owner, ts.upload(owner, f"own-{i}")) for i in range(4)]
    foreign = [(t, ts.upload(t, f"foreign-{i}")) for t in others for i in range(3)]
    mine = {a for _, a in owned}

    violations: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for wid, w in ts.workers().items():
                held = set(w.resident_adapter_ids)
                strangers = held - mine if wid == pool else held & mine
                if strangers:
                    violations.append(f"{wid} holds {sorted(strangers)}")
            done.wait(0.05)

    def place(pick: tuple[Tenant, str]) -> tuple[str, str]:
        tenant, adapter_id = pick
        try:
            return adapter_id, ts.place(tenant, adapter_id).worker_id
        except grpc.RpcError as err:
            return adapter_id, err.code().name

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        picks = [rng.choice(owned) if rng.random() < 0.4 else rng.choice(foreign) for _ in range(80)]
        with ThreadPoolExecutor(4) as pool_threads:
            results = list(pool_threads.map(place, picks))
    finally:
        done.set()
        watcher.join()

    assert violations == []
    placed = [(a, where) for a, where in results if where in WORKERS]
    for adapter_id, where in placed:
        assert (where == pool) == (adapter_id in mine), f"{adapter_id} placed on {where}"
    assert {where for _, where in results} <= {*WORKERS, "UNAVAILABLE"}, "only 'no room right now' may fail"
    assert len(placed) >= len(results) * 3 // 4
    assert {a for a, _ in placed} >= mine, "every adapter of the pool's tenant was loaded, in turn, in its pool"
    final = ts.workers()
    assert set(final[pool].resident_adapter_ids) <= mine
    assert not any(set(final[w].resident_adapter_ids) & mine for w in WORKERS[1:])

    # Forced loads across the border are refused both ways.
    assert code_of(lambda: ts.force_load(foreign[0][1], pool))[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: ts.force_load(owned[0][1], WORKERS[1]))[0] == grpc.StatusCode.FAILED_PRECONDITION


def test_a_pool_that_is_down_is_unavailable_unless_its_tenant_may_spill_over(ts: TierStack) -> None:
    owner = ts.tenant("downed-owner", tenant_pb2.TIER_DEDICATED)
    first, second = ts.upload(owner, "first"), ts.upload(owner, "second")
    pool = WORKERS[0]
    ts.assign(pool, owner)
    assert ts.place(owner, first).worker_id == pool

    ts.kill_sim(pool)
    for failed in (code_of(lambda: ts.place(owner, first)), code_of(lambda: ts.place(owner, second))):
        code, details, http = failed
        assert (code, http) == (grpc.StatusCode.UNAVAILABLE, "503")
        assert "dedicated" in details
    assert ts.holders(second) == set(), "nothing spilled over unasked"
    assert code_of(lambda: ts.pin(owner, second))[0] == grpc.StatusCode.UNAVAILABLE
    assert ts.describe(owner).pinned_adapter_ids == [], "a pin that could not be loaded is taken back"

    assert ts.set_capacity(owner, spill_over=True).spill_over
    assert ts.place(owner, second).worker_id in WORKERS[1:]
    ts.set_capacity(owner, spill_over=False)

    # Shared again: its adapters go anywhere, and so do the others'.
    assert ts.unassign(pool).tenant_id == owner.id
    ts.restore()
    other = ts.tenant("downed-other", tenant_pb2.TIER_SHARED)
    theirs = ts.upload(other, "theirs")
    assert ts.force_load(theirs, pool).worker_id == pool
    assert ts.workers()[pool].pool_tenant_id == ""
    assert ts.force_load(first, WORKERS[2]).worker_id == WORKERS[2]


# pinned adapters


def test_pins_are_counted_against_the_allowance(ts: TierStack) -> None:
    tenant = ts.tenant("pinner", tenant_pb2.TIER_RESERVED)
    assert ts.describe(tenant).pinned_slots == 2
    a, b, c, d = (ts.upload(tenant, f"pin-{i}") for i in range(4))

    pinned = ts.pin(tenant, a)
    assert (pinned.pinned, pinned.pinned_slots, pinned.adapter.pinned) == (1, 2, True)
    assert a in ts.workers()[pinned.worker_id].resident_adapter_ids, "resident when PinAdapter returns"
    assert a in ts.workers()[pinned.worker_id].pinned_adapter_ids
    routing = ts.admin.GetRoutingTable(admin_pb2.GetRoutingTableRequest(), metadata=ts.operator, timeout=10)
    assert [list(w.pinned_adapter_ids) for w in routing.workers if w.worker_id == pinned.worker_id] == [[a]]
    got = ts.adapters.GetAdapter(adapter_pb2.GetAdapterRequest(id=a), metadata=tenant.metadata, timeout=10)
    assert got.adapter.pinned
    assert ts.pin(tenant, b).pinned == 2
    assert ts.pin(tenant, a).pinned == 2, "pinning again takes no other slot"

    code, details, http = code_of(lambda: ts.pin(tenant, c))
    assert (code, http) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "429")
    assert "2" in details
    assert sorted(ts.describe(tenant).pinned_adapter_ids) == sorted([a, b])

    raised = ts.set_capacity(tenant, pinned_slots=3)
    assert (raised.pinned_slots, raised.own_pinned_slots) == (3, True)
    assert ts.pin(tenant, c).pinned == 3
    # Fewer slots than pins, by its own allowance or by a lower tier's: refused until pins go.
    code, details, http = code_of(lambda: ts.set_capacity(tenant, pinned_slots_tier_default=True))
    assert (code, http) == (grpc.StatusCode.FAILED_PRECONDITION, "409") and "unpin 1" in details, details
    assert ts.describe(tenant).pinned_slots == 3

    # Deleting pinned adapters gives their slots back.
    ts.delete(tenant, a)
    assert ts.set_capacity(tenant, pinned_slots_tier_default=True).pinned_slots == 2
    assert code_of(lambda: ts.pin(tenant, d))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, details, _ = code_of(lambda: ts.set_tier(tenant, tenant_pb2.TIER_SHARED))  # shared: 0 slots
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "unpin 2" in details, details
    assert ts.describe(tenant).tier == tenant_pb2.TIER_RESERVED
    ts.delete(tenant, b)
    assert sorted(ts.describe(tenant).pinned_adapter_ids) == [c]
    assert ts.pin(tenant, d).pinned == 2

    shared = ts.tenant("pinner-shared", tenant_pb2.TIER_SHARED)
    code, details, _ = code_of(lambda: ts.pin(shared, ts.upload(shared, "no-pin")))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "0" in details
    assert ts.own(shared) and ts.describe(shared).pinned_adapter_ids == []


def test_an_eviction_storm_never_evicts_a_pinned_adapter_and_unpinning_makes_it_evictable(ts: TierStack) -> None:
    tenant = ts.tenant("storm-pinner", tenant_pb2.TIER_RESERVED)
    flood = ts.tenant("storm-flood", tenant_pb2.TIER_RESERVED)
    pinned = ts.upload(tenant, "pinned")
    where = ts.pin(tenant, pinned).worker_id
    others = [ts.upload(flood, f"flood-{i}") for i in range(3 * len(WORKERS) * SLOTS)]

    def place(adapter_id: str) -> str:
        try:
            return ts.place(flood, adapter_id).worker_id
        except grpc.RpcError as err:
            return err.code().name

    with ThreadPoolExecutor(4) as threads:
        for _ in range(2):
            results = list(threads.map(place, others))
            assert ts.holders(pinned) == {where}
    assert sum(r in WORKERS for r in results) >= len(others) * 3 // 4
    assert sum(len(w.resident_adapter_ids) for w in ts.workers().values()) == len(WORKERS) * SLOTS, "slots are full"

    ts.unpin(tenant, pinned)
    assert not ts.describe(tenant).pinned_adapter_ids
    for i in range(len(WORKERS) * SLOTS):  # as many new adapters as slots: it is the least recently used
        ts.place(flood, ts.upload(flood, f"fresh-{i}"))
    assert ts.holders(pinned) == set()


def test_a_pinned_adapter_is_loaded_again_when_its_worker_is_lost(ts: TierStack) -> None:
    tenant = ts.tenant("lost-pinner", tenant_pb2.TIER_RESERVED)
    pinned = ts.upload(tenant, "pinned")
    where = ts.pin(tenant, pinned).worker_id

    ts.kill_sim(where)
    seconds = wait_for(lambda: bool(ts.holders(pinned)), 15, "the pinned adapter was not loaded elsewhere")
    assert ts.holders(pinned) <= set(WORKERS) - {where}
    assert seconds < 10


def test_a_tenant_that_gets_a_pool_has_its_pins_brought_into_it_and_kept_there(ts: TierStack) -> None:
    """A reserved tenant with a pinned adapter becomes dedicated: the pin follows it into its
    pool, where its own placements never evict it; the copy left on a shared worker, which its
    requests no longer reach, is an ordinary adapter there."""
    tenant = ts.tenant("upgraded-pinner", tenant_pb2.TIER_RESERVED)
    pinned = ts.upload(tenant, "pinned")
    shared_copy = ts.pin(tenant, pinned).worker_id
    pool = next(w for w in WORKERS if w != shared_copy)
    ts.set_tier(tenant, tenant_pb2.TIER_DEDICATED)
    ts.assign(pool, tenant)

    wait_for(lambda: pool in ts.holders(pinned), 15, "the pinned adapter was not loaded into its tenant's pool")
    for i in range(2 * SLOTS):
        assert ts.place(tenant, ts.upload(tenant, f"pooled-{i}")).worker_id == pool
        assert pool in ts.holders(pinned), "evicted from its pool by its own tenant's placements"

    flood = ts.tenant("upgraded-flood", tenant_pb2.TIER_RESERVED)
    for i in range(2 * SLOTS * (len(WORKERS) - 1)):
        ts.place(flood, ts.upload(flood, f"flood-{i}"))
    assert ts.holders(pinned) == {pool}


def test_a_spilling_tenants_pin_is_kept_on_the_shared_workers_while_its_pool_is_down(ts: TierStack) -> None:
    owner = ts.tenant("spilling-pinner", tenant_pb2.TIER_DEDICATED)
    flood = ts.tenant("spilling-flood", tenant_pb2.TIER_RESERVED)
    pool = WORKERS[0]
    ts.assign(pool, owner)
    ts.set_capacity(owner, spill_over=True)
    pinned = ts.upload(owner, "pinned")
    assert ts.pin(owner, pinned).worker_id == pool

    ts.kill_sim(pool)
    wait_for(lambda: bool(ts.holders(pinned)), 15, "the pinned adapter was not loaded on a shared worker")
    (spilled,) = ts.holders(pinned)
    for i in range(2 * SLOTS * (len(WORKERS) - 1)):
        ts.place(flood, ts.upload(flood, f"flood-{i}"))
        assert ts.holders(pinned) == {spilled}, "a spilled pin was evicted by others' pressure"

    # Its pool back, the pin is there again, and the shared copy is an ordinary adapter.
    ts.restore()
    wait_for(lambda: pool in ts.holders(pinned), 15, "the pinned adapter is not back in its pool")
    for i in range(2 * SLOTS * (len(WORKERS) - 1)):
        ts.place(flood, ts.upload(flood, f"fresh-{i}"))
    assert ts.holders(pinned) == {pool}
