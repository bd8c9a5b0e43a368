"""The reconciler: plan vs running instances -> stops then starts; retries; gossip payload."""

import asyncio
from pathlib import Path

import pytest

from aivailable.backends.fake_engine import FakeEngine
from aivailable.cluster import state as cs
from aivailable.cluster.instances import Instances
from aivailable.cluster.payload import gpu_capacity, node_payload, read_payload
from aivailable.cluster.reconciler import (
    ReconcilerConfig,
    Running,
    Step,
    local_gpu_id,
    plan_steps,
)
from aivailable.cluster.runner import Reconciler, Trigger
from aivailable.cluster.state import ClusterState, ModelRecord
from aivailable.gpu import GpuInfo
from placement import Assignment, Gpu, Plan

MIB = 1 << 20
GIB = 1 << 30


def rec(name, source=None, n_ctx=2048):
    return ModelRecord(name, source or f"/m/{name}.gguf", n_ctx=n_ctx)


def a(model, node="n1", gpus=("gpu0",), vram=None):
    gpus = tuple(f"{node}/{g}" for g in gpus)
    return Assignment(model, node, gpus, vram or tuple(100 for _ in gpus))


# ---- the pure core --------------------------------------------------------------------------


def test_starts_what_is_assigned_here_with_local_gpu_ids():
    steps = plan_steps("n1", [a("m1"), a("m2", node="n2")], {"m1": rec("m1"), "m2": rec("m2")}, {})
    assert steps == [Step("start", "m1", "/m/m1.gguf", ("gpu0",), (), 2048)]


def test_a_split_instance_gets_its_tensor_split():
    steps = plan_steps("n1", [a("m", gpus=("gpu0", "gpu1"), vram=(300, 100))], {"m": rec("m")}, {})
    assert steps[0].gpus == ("gpu0", "gpu1") and steps[0].tensor_split == (0.75, 0.25)


def test_what_matches_is_left_alone_and_a_new_estimate_does_not_reload():
    running = {"m1": Running("/m/m1.gguf", ("gpu0",), "ready", 2048)}
    assert plan_steps("n1", [a("m1", vram=(999,))], {"m1": rec("m1")}, running) == []


def test_stops_come_before_starts_and_a_moved_instance_restarts():
    running = {
        "gone": Running("/m/gone.gguf", ("gpu0",), "ready"),
        "moved": Running("/m/moved.gguf", ("gpu0",), "ready", 2048),
        "resourced": Running("/m/old.gguf", ("gpu1",), "ready", 2048),
        "reconfigured": Running("/m/reconfigured.gguf", ("gpu1",), "loading", 2048),
    }
    models = {m: rec(m) for m in ("moved", "resourced", "reconfigured", "new")}
    models["reconfigured"] = rec("reconfigured", n_ctx=4096)
    wanted = [
        a("moved", gpus=("gpu1",)),
        a("resourced", gpus=("gpu1",)),
        a("reconfigured", gpus=("gpu1",)),
        a("new"),
    ]
    steps = plan_steps("n1", wanted, models, running)
    assert [(s.action, s.model) for s in steps] == [
        ("stop", "gone"),
        ("stop", "moved"),
        ("stop", "reconfigured"),
        ("stop", "resourced"),
        ("start", "moved"),
        ("start", "new"),
        ("start", "reconfigured"),
        ("start", "resourced"),
    ]


def test_a_failed_instance_restarts_only_when_due():
    running = {"m": Running("/m/m.gguf", ("gpu0",), "failed", 2048)}
    assert plan_steps("n1", [a("m")], {"m": rec("m")}, running) == []
    steps = plan_steps("n1", [a("m")], {"m": rec("m")}, running, retry_due={"m"})
    assert [s.action for s in steps] == ["stop", "start"]


def test_an_assignment_of_an_undeployed_model_is_ignored():
    running = {"m": Running("/m/m.gguf", ("gpu0",), "ready")}
    assert plan_steps("n1", [a("m")], {}, running) == [Step("stop", "m")]


def test_local_gpu_id():
    assert local_gpu_id("n1", "n1/gpu3") == "gpu3"
    assert local_gpu_id("n1", "gpu3") == "gpu3"
    assert local_gpu_id("n1", "n10/gpu3") == "n10/gpu3"


# ---- gossip payload -------------------------------------------------------------------------


def test_gpu_capacity_excludes_other_programs_and_headroom_but_not_our_own_use():
    # 8 GiB card, 2 GiB held by our model, 1 GiB by someone else: 5 GiB free.
    cap = gpu_capacity(8 * GIB, 5 * GIB, 2 * GIB, 256 * MIB, 64 * MIB)
    assert cap == 7 * GIB - 256 * MIB
    # A simulated GPU reports all of it free whatever runs: capacity is still total - headroom.
    assert gpu_capacity(8 * GIB, 8 * GIB, 2 * GIB, 256 * MIB) == 8 * GIB - 256 * MIB
    assert gpu_capacity(GIB, 0, 0, 2 * GIB) == 0
    assert gpu_capacity(GIB + 5, GIB + 5, 0, 0, 64 * MIB) == GIB


def test_payload_round_trip():
    gpus = [GpuInfo("gpu0", "fake", "GTX 1080", 8 * GIB, 8 * GIB, "", "")]
    views = [{"model": "m", "state": "ready", "queue_depth": 3, "gpus": ["gpu0"], "source": "x"}]
    payload = node_payload(
        "127.0.0.1:8001", "c1", gpus, {"gpu0": GIB}, views, [("ab" * 32, 10, "x")]
    )
    got = read_payload("n1", payload)
    assert got.addr == "127.0.0.1:8001" and got.cluster_id == "c1"
    assert got.gpus == (Gpu("n1/gpu0", "fake", "GTX 1080", 8 * GIB - 256 * MIB),)
    assert got.vram_total == (8 * GIB,) and got.vram_free == (8 * GIB,)
    assert [(i.model, i.state, i.queue_depth, i.gpus) for i in got.instances] == [
        ("m", "ready", 3, ("gpu0",))
    ]
    assert got.files == (("ab" * 32, 10, "x"),)


@pytest.mark.parametrize(
    "payload",
    [
        None,
        {},
        {"v": 2},
        {"v": 1, "gpus": [["g"]]},
        {"v": 1, "gpus": [["g", "martian", "x", 1, 1, 1]]},
        {"v": 1, "inst": 5},
    ],
)
def test_a_malformed_payload_reads_as_empty(payload):
    got = read_payload("n1", payload)
    assert got.gpus == () and got.instances == ()


# ---- the loop against real Instances with the fake engine ----------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class World:
    """A node "n1" with Instances backed by FakeEngine, and a cluster state to drive it."""

    def __init__(self, tg, fail_sources=(), ensure_file=None, load_delay=0.0, ready=None):
        self.state = ClusterState()
        self.engines: list[tuple[str, tuple, FakeEngine]] = []
        self.fail_sources = set(fail_sources)
        self.clock = Clock()

        def resolve(source):
            if source in self.fail_sources:
                raise FileNotFoundError(f"no such model file {source}")
            return Path("/models") / Path(source).name

        def factory(spec):
            engine = FakeEngine(spec.model, load_delay=load_delay)
            self.engines.append((spec.model, spec.gpus, engine))
            return engine

        self.instances = Instances(resolve, factory, tg)
        self.trigger = Trigger()
        self.rc = Reconciler(
            "n1",
            self.state,
            self.instances,
            self.trigger,
            ensure_file,
            ReconcilerConfig(retry_s=5.0, tick_s=0.02),
            self.clock,
            ready=ready or (lambda: True),
        )

    def deploy(self, *names):
        for n in names:
            self.state.apply(cs.encode_deploy(n, f"/m/{n}.gguf"), 1)

    def plan(self, *assignments, term=1):
        r = self.state.apply(cs.encode_plan(Plan(tuple(assignments)), term), term)
        assert r.ok, r.error

    async def settle(self, within: float = 5.0):
        """Let loads finish: until no instance is pending or loading (model files resolve
        in a thread, which a loaded machine may take a while to run), at most `within` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            for _ in range(100):
                await asyncio.sleep(0)
            busy = [v for v in self.rc.views() if v["state"] in ("pending", "loading")]
            if not busy or loop.time() > deadline:
                return
            await asyncio.sleep(0.01)

    def states(self):
        return {v["model"]: (v["state"], tuple(v["gpus"])) for v in self.rc.views()}


async def test_a_restarted_peer_acts_on_no_plan_until_it_has_caught_up():
    caught_up = False
    async with asyncio.TaskGroup() as tg:
        w = World(tg, ready=lambda: caught_up)
        w.deploy("old")
        w.plan(Assignment("old", "n1", ("n1/gpu0",), (GIB,)))  # restored from its snapshot
        assert await w.rc.reconcile() == [] and w.rc.views() == []
        # The leader's log says "old" moved away; only then does this peer act, on that.
        w.plan(term=2)
        caught_up = True
        assert await w.rc.reconcile() == [] and w.engines == []
        w.plan(Assignment("old", "n1", ("n1/gpu0",), (GIB,)), term=2)
        assert [s.action for s in await w.rc.reconcile()] == ["start"]
        caught_up = False  # later (a partition, an election) it keeps acting: it caught up once
        w.plan(term=2)
        assert [s.action for s in await w.rc.reconcile()] == ["stop"]
        await w.instances.stop_all()


async def test_reconcile_starts_stops_and_is_idempotent():
    async with asyncio.TaskGroup() as tg:
        w = World(tg)
        w.deploy("m1", "m2")
        w.plan(a("m1"), a("m2", gpus=("gpu1",)), a("m2", node="n2"))
        steps = await w.rc.reconcile()
        assert [(s.action, s.model) for s in steps] == [("start", "m1"), ("start", "m2")]
        await w.settle()
        assert w.states() == {"m1": ("ready", ("gpu0",)), "m2": ("ready", ("gpu1",))}
        assert await w.rc.reconcile() == []  # nothing to do twice
        assert w.rc.launch("m2").gpus == ("gpu1",)
        assert w.rc.own_vram() == {"gpu0": 100, "gpu1": 100}
        # m2 moves to gpu0 beside m1; m1 leaves this node.
        w.plan(a("m2", gpus=("gpu0",)), a("m1", node="n2"))
        steps = await w.rc.reconcile()
        assert [(s.action, s.model) for s in steps] == [
            ("stop", "m1"),
            ("stop", "m2"),
            ("start", "m2"),
        ]
        await w.settle()
        assert w.states() == {"m2": ("ready", ("gpu0",))}
        assert [e.state for m, _, e in w.engines if m == "m1"] == ["pending"]  # stopped
        # Undeployed: stopped even before a new plan says so.
        w.state.apply(cs.encode_undeploy("m2"), 1)
        await w.rc.reconcile()
        assert w.states() == {}
        await w.instances.stop_all()


async def test_a_preloaded_model_waits_for_the_first_plan_which_adopts_or_stops_it():
    async with asyncio.TaskGroup() as tg:
        w = World(tg)
        for model in ("m", "other"):  # started before any plan, as ClusterNode._preload does
            w.instances.start(model, f"/m/{model}.gguf", ("gpu0",))
        await w.settle()
        w.deploy("m")
        assert await w.rc.reconcile() == []  # no plan yet: left alone
        w.plan(a("m"))
        steps = await w.rc.reconcile()
        assert [(s.action, s.model) for s in steps] == [("stop", "other")]  # m adopted
        assert w.states() == {"m": ("ready", ("gpu0",))}
        assert [m for m, _, _ in w.engines].count("m") == 1  # never reloaded
        await w.instances.stop_all()


async def test_a_failed_instance_is_retried_with_growing_backoff():
    async with asyncio.TaskGroup() as tg:
        w = World(tg, fail_sources={"/m/m.gguf"})
        w.deploy("m")
        w.plan(a("m"))
        await w.rc.reconcile()
        await w.settle()
        assert w.states()["m"][0] == "failed"
        assert await w.rc.reconcile() == []  # failure noted at t=0: retry due at t=5
        w.clock.now = 4.9
        assert await w.rc.reconcile() == []
        w.clock.now = 5.0
        assert [s.action for s in await w.rc.reconcile()] == ["stop", "start"]
        await w.settle()
        assert w.states()["m"][0] == "failed"
        await w.rc.reconcile()  # second failure noted at t=5: next retry 10 s later
        w.clock.now = 14.9
        assert await w.rc.reconcile() == []
        w.fail_sources.clear()  # the file turned up
        w.clock.now = 15.0
        assert [s.action for s in await w.rc.reconcile()] == ["stop", "start"]
        await w.settle()
        assert w.states()["m"][0] == "ready"
        await w.instances.stop_all()


async def test_the_file_is_fetched_first_and_a_failed_fetch_shows_and_retries():
    fetched, attempts = [], []

    async def ensure_file(record):
        attempts.append(record.name)
        if len(attempts) == 1:
            raise OSError("no peer has it and the source is unreachable")
        await asyncio.sleep(0.01)
        fetched.append(record.name)
        return Path("/models/m.gguf")

    w = None
    async with asyncio.TaskGroup() as tg:
        w = World(tg, ensure_file=ensure_file)
        w.deploy("m")
        w.plan(a("m"))
        run = tg.create_task(w.rc.run())
        await w.settle()
        view = {v["model"]: v for v in w.rc.views()}["m"]
        assert view["state"] == "failed" and "unreachable" in view["error"]
        w.clock.now = 5.0
        w.trigger.fire()
        for _ in range(500):
            if w.states().get("m", ("",))[0] == "ready":
                break
            await asyncio.sleep(0.01)
        assert fetched == ["m"] and w.states()["m"] == ("ready", ("gpu0",))
        run.cancel()
        await w.instances.stop_all()


async def test_a_model_moved_away_during_its_fetch_is_not_started():
    gate = asyncio.Event()

    async def ensure_file(record):
        await gate.wait()
        return Path("/models/m.gguf")

    async with asyncio.TaskGroup() as tg:
        w = World(tg, ensure_file=ensure_file)
        w.deploy("m")
        w.plan(a("m"))
        run = tg.create_task(w.rc.run())
        await w.settle(within=0.1)  # the fetch is held at the gate: it stays pending
        assert w.states() == {"m": ("pending", ("gpu0",))}
        w.plan(a("m", node="n2"))
        w.trigger.fire()
        await w.settle(within=0.1)
        gate.set()
        await w.settle()
        assert w.states() == {} and w.engines == []
        run.cancel()


async def test_run_follows_plan_changes_on_the_trigger():
    async with asyncio.TaskGroup() as tg:
        w = World(tg, load_delay=0.01)
        w.rc.config = ReconcilerConfig(tick_s=60.0)
        run = tg.create_task(w.rc.run())
        await w.settle()
        w.deploy("m")
        w.plan(a("m"))
        w.trigger.fire()
        for _ in range(500):
            if w.states().get("m", ("",))[0] == "ready":
                break
            await asyncio.sleep(0.01)
        assert w.states()["m"] == ("ready", ("gpu0",))
        run.cancel()
        await w.instances.stop_all()


async def test_models_with_unknown_checksums_are_handed_to_discover():
    seen = []

    async def discover(records):
        seen.append(sorted(r.name for r in records))

    async with asyncio.TaskGroup() as tg:
        w = World(tg)
        w.rc = Reconciler("n1", w.state, w.instances, w.trigger, discover=discover)
        w.deploy("a", "b")
        w.state.apply(cs.encode_model_file("b", "/m/b.gguf", "ab" * 32, 10), 1)
        run = tg.create_task(w.rc.run())
        await w.settle()
        run.cancel()
    assert seen and seen[0] == ["a"]
