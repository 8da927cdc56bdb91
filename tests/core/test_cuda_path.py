"""The CUDA path's host-side logic, on the CPU: host tensors stay on the host when vLLM builds
the model under a device context, copies are waited for before their memory is reused, dummy
runs leave the CPU alone. A meta device stands in for the accelerator (shapes, no data)."""

import pytest
import torch

from daop_vllm.core.batch import StepBatch
from daop_vllm.core.cpu_executor import CpuExpertExecutor, default_cpu_threads, physical_core_count
from daop_vllm.core.device_cache import SlotTablePublisher
from daop_vllm.core.engine import DaopEngine
from daop_vllm.core.expert_store import HostExpertStore
from daop_vllm.core.routing import SoftmaxTopK

E, H, I, L = 8, 16, 24, 3


class RecordingEvent:
    """Stands in for torch.cuda.Event: records what waited on it, in order."""

    log: list[tuple[str, int]] = []
    made = 0

    def __init__(self) -> None:
        RecordingEvent.made += 1
        self.id = RecordingEvent.made

    def record(self, stream=None) -> None:
        RecordingEvent.log.append(("record", self.id))

    def query(self) -> bool:
        return False  # still in flight, as far as the caller can tell

    def synchronize(self) -> None:
        RecordingEvent.log.append(("synchronize", self.id))


def tensors_of(obj) -> dict[str, torch.Tensor]:
    return {name: value for name, value in vars(obj).items() if isinstance(value, torch.Tensor)}


def test_an_engine_built_under_a_device_context_keeps_its_host_tensors_on_the_host():
    """vLLM calls the loader's create_model under `with torch.device(<accelerator>)`: tensors
    made without an explicit device land there. Built so (meta standing in for CUDA), every
    host-side tensor of the engine is on the CPU and only the slots and their table on the device."""
    with torch.device("meta"):
        engine = DaopEngine(torch.device("meta"), cpu_threads=1)
        layers = [engine.add_layer(E, H, I, torch.float32, SoftmaxTopK(2)) for _ in range(L)]
        engine.place([[0, 1]] * L)
        engine.begin_step(StepBatch(("a",), (3,), (True,), (False,)))
        engine.requests.row_phases(3)
    device_side = {"w13", "w2", "slot_of_expert"}
    for owner in [engine.requests, *layers, *(layer.store for layer in layers)]:
        for name, tensor in tensors_of(owner).items():
            assert tensor.device.type == "cpu", f"{type(owner).__name__}.{name} is on {tensor.device}"
    for layer in layers:
        for name, tensor in tensors_of(layer.cache).items():
            expected = "meta" if name in device_side else "cpu"
            assert tensor.device.type == expected, f"DeviceExpertCache.{name} is on {tensor.device}"
    counts = [*engine.requests.prefill_counts.values(), *engine.requests.decode_counts.values()]
    assert counts and all(c.device.type == "cpu" for c in counts)
    engine.close()


def test_place_waits_for_swaps_in_flight_before_it_frees_their_slots():
    """A copy still writing into a layer's slots when `place` gives the layer new ones (other
    slot count): its completion is awaited and its expert counted in, before the old slots go."""
    engine = DaopEngine(torch.device("meta"), cpu_threads=1)
    layer = engine.add_layer(E, H, I, torch.float32, SoftmaxTopK(2))
    engine.place([[0, 1]])
    old = layer.cache
    old._expert_in_slot[1] = None  # what start_swap does: 1 retires, 5 is on its way into slot 1
    RecordingEvent.log.clear()
    copy = RecordingEvent()
    old._incoming.append((1, 5, copy))
    engine.place([[0, 1, 2]])
    assert ("synchronize", copy.id) in RecordingEvent.log, "the copy into the freed slots was not awaited"
    assert old.swaps_in_flight == 0 and old.resident_experts == [0, 5]
    assert layer.cache is not old and layer.cache.resident_experts == [0, 1, 2]
    engine.close()


def test_the_slot_table_goes_to_the_device_through_two_buffers_each_reused_after_its_copy():
    RecordingEvent.log.clear()
    publisher = SlotTablePublisher(4, pin_memory=False, new_event=RecordingEvent)
    target = torch.full((4,), -7, dtype=torch.int64)
    tables = [torch.tensor([i, -1, i, -1]) for i in range(4)]
    for table in tables:
        publisher.publish(table, target)
        assert target.tolist() == table.tolist()
    records = [event for op, event in RecordingEvent.log if op == "record"]
    waits = [event for op, event in RecordingEvent.log if op == "synchronize"]
    assert len(records) == 4, "one event after every copy"
    # the third publish rewrites the first buffer: it waits for the first copy, the fourth for the second
    assert waits == records[:2]
    assert RecordingEvent.log.index(("synchronize", records[0])) > RecordingEvent.log.index(("record", records[1]))


def test_a_lane_is_reused_only_after_the_copy_of_its_last_result():
    """The CPU result is copied to the device asynchronously from the lane's (pinned) buffer:
    the lane's next job waits for that copy before it overwrites the buffer."""
    executor = CpuExpertExecutor(1)
    store = HostExpertStore(E, H, I, torch.float32, pin_memory=False)
    store.w13.normal_()
    store.w2.normal_()
    x = torch.randn(2, H)
    ids, weights = torch.tensor([[0, 1], [2, 3]]), torch.full((2, 2), 0.5)
    table = torch.arange(E)
    job = executor.submit(x, ids, weights, store.w13, store.w2, table)
    result = job.result()
    assert job.owns(result)
    RecordingEvent.log.clear()
    copy = RecordingEvent()
    job.release_after(copy)
    executor.submit(x, ids, weights, store.w13, store.w2, table).result()
    assert RecordingEvent.log == [("synchronize", copy.id)]
    executor.shutdown()


def test_the_host_store_holds_exactly_its_experts_bytes():
    store = HostExpertStore(E, H, I, torch.bfloat16, pin_memory=False)
    assert store.host_bytes == E * store.expert_bytes == E * 3 * H * I * 2
    engine = DaopEngine(torch.device("cpu"), cpu_threads=1)
    for _ in range(L):
        engine.add_layer(E, H, I, torch.bfloat16, SoftmaxTopK(2))
    report = engine.report()
    assert report["host_expert_bytes"] == L * E * 3 * H * I * 2 and report["host_expert_bytes_pinned"] == 0
    engine.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: pins host memory")
def test_pinned_stores_are_pinned_at_their_own_size():
    store = HostExpertStore(3, 1000, 700, torch.bfloat16, pin_memory=True)  # not a power of two
    assert store.w13.is_pinned() and store.w2.is_pinned()
    assert store.host_bytes == 3 * 3 * 1000 * 700 * 2


def test_the_default_executor_leaves_a_core_to_the_device_launcher():
    cores = physical_core_count()
    assert default_cpu_threads("cpu") == cores
    assert default_cpu_threads("cuda") == max(1, cores - 1)


def test_dummy_runs_skip_the_cpu_experts_and_count_nothing():
    """vLLM's profile and warm-up runs: no CPU job, no counters; the resident experts still run."""
    engine = DaopEngine(torch.device("cpu"), cpu_threads=1)
    layer = engine.add_layer(E, H, I, torch.float32, SoftmaxTopK(2))
    layer.store.w13.normal_()
    layer.store.w2.normal_()
    engine.place([[0, 1, 2, 3]])
    x, logits = torch.randn(64, H), torch.randn(64, E)
    with engine.dummy_run():
        out = layer.forward(x, logits)
    weights, ids = SoftmaxTopK(2)(logits)
    resident_only = layer.device_forward(x, ids, weights, layer.cache.w13, layer.cache.w2, layer.cache.slot_of_expert)
    torch.testing.assert_close(out, resident_only)
    assert engine.executor.jobs_submitted == 0 and engine.stats.totals()["cpu_expert_tokens"] == 0
    layer.forward(x, logits)  # outside the dummy run: the host experts are computed again
    assert engine.executor.jobs_submitted == 1
    engine.close()


def _run_transfers_case(resident: list[int], one_memory: bool) -> tuple[DaopEngine, list[torch.Tensor]]:
    """Exact mode, one step of L layers: 3 prompt rows of request a, 1 decode row of b."""
    engine = DaopEngine(torch.device("cpu"), cpu_threads=1, one_memory=one_memory)
    layers = [engine.add_layer(E, H, I, torch.float32, SoftmaxTopK(2)) for _ in range(L)]
    gen = torch.Generator().manual_seed(5)
    for layer in layers:
        layer.store.w13.copy_(torch.randn(layer.store.w13.shape, generator=gen))
        layer.store.w2.copy_(torch.randn(layer.store.w2.shape, generator=gen))
    engine.place([resident] * L)
    engine.begin_step(StepBatch(("a", "b"), (3, 1), (True, False), (True, False)))
    logits = torch.full((4, E), -5.0)
    logits[:, [3, 6]] = 5.0  # every row: expert 3 (resident in both) and 6 (host-resident at half)
    outs = [layer.forward(torch.randn(4, H, generator=gen), logits) for layer in layers]
    engine.end_step()
    return engine, outs


@pytest.mark.parametrize("resident, to_host, to_device", [(list(range(E)), 0, 0), ([0, 1, 2, 3], 1, 1)],
                         ids=["every-expert", "half"])
def test_transfers_per_layer(resident, to_host, to_device):
    """Exact mode, in a step, with device and host two memories (the CUDA path's structure, run
    on the CPU): a layer whose experts are all resident copies nothing to the host (no sync);
    any other makes one packed copy there (input and routing) and one back (the CPU result).
    On the CPU the calls move no byte; they count what the CUDA path would copy. Where device
    and host are one memory, no layer calls them, and the outputs and counters are the same."""
    engine, outs = _run_transfers_case(resident, one_memory=False)
    transfers = engine.transfers
    assert (transfers.to_host_calls, transfers.to_device_calls) == (L * to_host, L * to_device)
    totals = engine.stats.totals()
    assert totals["device_expert_tokens"] + totals["cpu_expert_tokens"] == L * 4 * 2
    assert totals["prefill_device_expert_tokens"] + totals["prefill_cpu_expert_tokens"] == L * 3 * 2
    assert totals["decode_device_expert_tokens"] + totals["decode_cpu_expert_tokens"] == L * 1 * 2
    assert totals["cpu_expert_tokens"] == (0 if len(resident) == E else L * 4)  # expert 6 of every row
    # the requests' demand feeds re-allocation, which a layer holding every expert never needs:
    # such layers count from their shape alone and read no routing
    want = [0.0] * L if len(resident) == E else [3.0] * L
    assert engine.requests.prefill_counts["a"][:, 6].tolist() == want
    one_memory, one_memory_outs = _run_transfers_case(resident, one_memory=True)
    assert (one_memory.transfers.to_host_calls, one_memory.transfers.to_device_calls) == (0, 0)
    assert one_memory.stats.totals() == totals
    for got, want_out in zip(one_memory_outs, outs):
        torch.testing.assert_close(got, want_out, rtol=1e-5, atol=1e-5)
    engine.close()
    one_memory.close()


@pytest.mark.parametrize("one_memory", [True, False], ids=["one-memory", "two-memories"])
@pytest.mark.parametrize("resident", [list(range(E)), [0, 1, 2, 3]], ids=["every-expert", "half"])
def test_padding_rows_count_in_no_counter(resident, one_memory):
    """CUDA graphs pad a step's rows to a captured size: rows past the batch's are no one's work,
    and count neither as device nor as CPU expert tokens; outside engine steps every row counts."""
    engine = DaopEngine(torch.device("cpu"), cpu_threads=1, one_memory=one_memory)
    layers = [engine.add_layer(E, H, I, torch.float32, SoftmaxTopK(2)) for _ in range(L)]
    for layer in layers:
        layer.store.w13.normal_()
        layer.store.w2.normal_()
    engine.place([resident] * L)
    engine.begin_step(StepBatch(("a", "b"), (3, 1), (True, False), (True, False)))
    for layer in layers:  # 4 rows of requests and 2 of padding
        layer.forward(torch.randn(6, H), torch.randn(6, E))
    engine.end_step()
    totals = engine.stats.totals()
    assert totals["device_expert_tokens"] + totals["cpu_expert_tokens"] == L * 4 * 2
    assert totals["prefill_device_expert_tokens"] + totals["prefill_cpu_expert_tokens"] == L * 3 * 2
    layers[0].forward(torch.randn(5, H), torch.randn(5, E))  # outside a step: every row counts
    engine.end_step()
    totals = engine.stats.totals()
    assert totals["device_expert_tokens"] + totals["cpu_expert_tokens"] == L * 4 * 2 + 5 * 2
    engine.close()
