"""Per-request routing state under continuous batching: what each request in flight used."""

from __future__ import annotations

import torch

from daop_vllm.core.batch import StepBatch
from daop_vllm.core.prediction import Prediction
from daop_vllm.core.step_counts import StepCounts

# How much one decayed decode token counts against one prompt token in a request's expected demand:
# the recent decode is the better predictor of the rest of the decode.
DECODE_WEIGHT = 4.0


class RequestTracker:
    """Per request and layer: expert counts of its prompt (all prefill chunks) and a decayed
    count of its decode. Entries are dropped when a request finishes, is aborted or is
    preempted (a resumed request starts over). Also the step's plan, shared by its layers:
    which request and phase each row is, the predictions made for later layers, and the
    routing counts, folded at the step's end (`take_counts`)."""

    def __init__(self, num_layers: int, num_experts: int, decode_decay: float = 0.9) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.decode_decay = decode_decay
        # When recording traces: req -> phase -> [layer] -> (expert-id rows, weight rows)
        self.recording = False
        self.routes: dict[str, dict[str, list[tuple[list, list]]]] = {}
        # Each request's counts are a row of one tensor [rows, (prompt, decode), L, E], so that a
        # step's decay and counts are an op for its whole batch, not one per request (~1.5 us each)
        self._counts = torch.zeros(0, 2, num_layers, num_experts, device="cpu")
        self._row_of: dict[str, int] = {}
        self._free_rows: list[int] = []
        self.prefill_counts: dict[str, torch.Tensor] = {}  # req -> [L, E], a view of its row
        self.decode_counts: dict[str, torch.Tensor] = {}  # req -> [L, E], decayed at each step while in flight
        self.remaining: dict[str, int] = {}  # req -> tokens it may still generate (its max_tokens left)
        self.batch: StepBatch | None = None
        self.step = 0  # counts begin_step calls: what a row's pre-computed results are keyed by
        self.dummy_run = False  # inside vLLM's dummy or profile run (DaopEngine.dummy_run)
        self._batch_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # the batch's (rows, phases) of _counts
        self._row_request: torch.Tensor | None = None  # the step's rows' requests, found when first asked
        self._row_prefill = torch.empty(0, dtype=torch.bool, device="cpu")
        self._row_request_on: dict[tuple, torch.Tensor] = {}  # the step's row maps on a device (on_device)
        self._decode_rows: dict[int, torch.Tensor | None] = {}  # the step's decode rows, by total rows
        self.predictions: dict[int, Prediction] = {}  # target layer -> the prediction made for it this step
        self.counts = StepCounts()

    def __len__(self) -> int:
        return len(self._row_of)

    def begin_step(self, batch: StepBatch) -> None:
        self.batch = batch
        self.step += 1
        for req_id, remaining in zip(batch.req_ids, batch.remaining):
            self.remaining[req_id] = remaining
        self._counts[:, 1].mul_(self.decode_decay)  # every request's decode counts, in one op
        for req_id in batch.req_ids:
            if req_id not in self._row_of:
                self._add(req_id)
        self._batch_rows = self._row_request = None
        self._start_plan()

    def set_shape(self, num_layers: int, num_experts: int) -> None:
        """The model's layers and experts per layer, as layers are added (before any request)."""
        assert not self._row_of, "the model's shape is set before requests come"
        self.num_layers, self.num_experts = num_layers, num_experts
        self._counts = torch.zeros(0, 2, num_layers, num_experts, device="cpu")
        self._free_rows = []

    def _add(self, req_id: str) -> None:
        """A row of zero counts for a new request; the rows double when none is free."""
        if not self._free_rows:
            grown = torch.zeros(max(8, 2 * len(self._counts)), *self._counts.shape[1:], device="cpu")
            grown[:len(self._counts)] = self._counts
            self._free_rows = list(range(len(grown) - 1, len(self._counts) - 1, -1))
            self._counts = grown
            for other, row in self._row_of.items():  # views of the new rows
                self.prefill_counts[other], self.decode_counts[other] = grown[row].unbind(0)
        row = self._row_of[req_id] = self._free_rows.pop()
        self._counts[row].zero_()
        self.prefill_counts[req_id], self.decode_counts[req_id] = self._counts[row].unbind(0)

    def _add_to_batch(self, counts: torch.Tensor, layers: slice = slice(None)) -> None:
        """counts [R, L', E] of the step's requests (the batch's order) into their prompt or
        decode counts, layers `layers`: one op."""
        if self._batch_rows is None:
            self._batch_rows = (torch.tensor([self._row_of[req_id] for req_id in self.batch.req_ids], device="cpu"),
                                torch.tensor([0 if prefill else 1 for prefill in self.batch.prefill], device="cpu"))
        self._counts[:, :, layers].index_put_(self._batch_rows, counts, accumulate=True)

    def _start_plan(self) -> None:
        for prediction in self.predictions.values():
            prediction.discard()  # made for a layer that did not run
        self.predictions = {}
        self._row_request_on = {}
        self._decode_rows = {}
        self.counts.clear()

    def row_phases(self, total_rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(request index per row, prefill flag per row) for this step, or None outside vLLM
        steps (e.g. profiling runs, or a batch whose rows do not match)."""
        if self.batch is None or self.batch.num_rows > total_rows:
            return None
        if self._row_request is None or self._row_request.numel() != total_rows:
            self._row_request = self.batch.row_request(total_rows)
            self._row_prefill = self.batch.row_is_prefill(total_rows)
        return self._row_request, self._row_prefill

    def decode_rows(self, total_rows: int) -> torch.Tensor | None:
        """This step's generated-token rows [D] (host), or None outside engine steps; found once
        per step (every layer asks)."""
        if total_rows in self._decode_rows:
            return self._decode_rows[total_rows]
        phases = self.row_phases(total_rows)
        rows = None
        if phases is not None:
            row_request, row_prefill = phases
            rows = ((row_request >= 0) & ~row_prefill).nonzero().squeeze(1)
        if self.batch is not None:  # outside steps every call is a call of its own
            self._decode_rows[total_rows] = rows
        return rows

    def on_device(self, name: str, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A row map of this step (`name`: which one) on `device`, copied once per step."""
        key = (name, device, rows.numel())
        cached = self._row_request_on.get(key)
        if cached is None:
            host = rows.pin_memory() if device.type == "cuda" else rows
            cached = self._row_request_on[key] = host.to(device, non_blocking=True)
        return cached

    def count(self, layer: int, executed: torch.Tensor, chosen: torch.Tensor) -> None:
        """Add layer `layer`'s routing [T, K] (the executed and the router's own, on the
        routing's device) to the step's counts, without reading anything back."""
        total_rows = executed.shape[0]
        num_requests = len(self.batch.req_ids) if self.batch is not None else 0
        key = ("count_rows", executed.device, total_rows)
        rows = self._row_request_on.get(key)
        if rows is None:
            phases = self.row_phases(total_rows)
            host = (torch.where(phases[0] >= 0, phases[0], num_requests) if phases is not None
                    else torch.full((total_rows,), num_requests, dtype=torch.int64, device="cpu"))
            rows = self.on_device("count_rows", host, executed.device)
        self.counts.add(layer, rows, executed, chosen, (self.num_layers, num_requests, self.num_experts))

    def take_counts(self) -> tuple[torch.Tensor | None, list[tuple[int, int, int]]]:
        """The step's executed counts [L, R+1, E] (host; None when no layer counted its
        routing), after adding each request's chosen counts to its prompt or decode counts; and
        the layers counted from their shape (StepCounts.add_resident)."""
        executed, chosen, resident = self.counts.take()
        if executed is not None and self.batch is not None:
            self._add_to_batch(chosen[:, :-1].transpose(0, 1))
        return executed, resident

    def record(self, layer: int, topk_ids: torch.Tensor, topk_weights: torch.Tensor | None = None) -> None:
        """Count layer `layer`'s routing [T, K] (host tensors) into each row's request at once,
        and keep the rows themselves when recording traces (the simulator's and tests' path; a
        layer's forward counts through `count`)."""
        self.record_layers(topk_ids[None], layer)
        if topk_weights is not None:
            self.record_routes(layer, topk_ids, topk_weights)

    def record_layers(self, topk_ids: torch.Tensor, first_layer: int = 0) -> None:
        """`record` for consecutive layers at once: topk_ids [L', T, K] from `first_layer` on."""
        phases = self.row_phases(topk_ids.shape[1])
        if phases is None:
            return
        row_request, _ = phases
        real = row_request >= 0
        num_layers, _, top_k = topk_ids.shape
        # [requests, L', E] tokens per expert of each request's rows, in one scatter
        counts = torch.zeros(len(self.batch.req_ids), num_layers, self.num_experts, device="cpu")
        ids = topk_ids[:, real]
        requests = row_request[real][None, :, None].expand(num_layers, -1, top_k)
        layers = torch.arange(num_layers, device="cpu")[:, None, None].expand_as(ids)
        counts.index_put_((requests.flatten(), layers.flatten(), ids.flatten()),
                          torch.ones(ids.numel(), device="cpu"), accumulate=True)
        self._add_to_batch(counts, slice(first_layer, first_layer + num_layers))

    def record_routes(self, layer: int, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        """Keep each request's rows of layer `layer`'s routing (host tensors), for its trace."""
        phases = self.row_phases(topk_ids.shape[0])
        if phases is None or not self.recording:
            return
        row_request, _ = phases
        for index, (req_id, prefill) in enumerate(zip(self.batch.req_ids, self.batch.prefill)):
            rows = row_request == index
            routes = self.routes.setdefault(req_id, {p: [([], []) for _ in range(self.num_layers)]
                                                     for p in ("prefill", "decode")})
            ids, weights = routes["prefill" if prefill else "decode"][layer]
            ids.extend(topk_ids[rows].tolist())
            weights.extend(topk_weights[rows].tolist())

    def expected_demand(self, top_k: int) -> torch.Tensor:
        """[L, E] (token, expert) work expected from the requests in flight until they finish:
        each request's per-token expert shares (prompt counts, plus its decayed decode counts
        weighted by DECODE_WEIGHT) times the tokens it may still generate (1 when unknown)."""
        if not self._row_of:
            return torch.zeros(self.num_layers, self.num_experts, device="cpu")
        rows = self._counts[list(self._row_of.values())]  # [n, 2, L, E]
        counts = rows[:, 0] + DECODE_WEIGHT * rows[:, 1]
        shares = counts / counts.sum(dim=2, keepdim=True).clamp_min(1e-9)
        tokens = torch.tensor([self.remaining.get(req_id, 1) * top_k for req_id in self._row_of], dtype=torch.float32)
        return (tokens[:, None, None] * shares).sum(0)

    def end_step(self) -> None:
        self.batch = None
        self._start_plan()

    def drop(self, req_id: str) -> dict[str, list[tuple[list, list]]] | None:
        """Forget a request; returns its recorded routes, if any."""
        row = self._row_of.pop(req_id, None)
        if row is not None:
            self._free_rows.append(row)
        self.prefill_counts.pop(req_id, None)
        self.decode_counts.pop(req_id, None)
        self.remaining.pop(req_id, None)
        return self.routes.pop(req_id, None)
