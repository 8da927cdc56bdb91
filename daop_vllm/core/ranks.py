"""An engine's place under tensor parallelism. vLLM splits every expert's intermediate size over
the ranks, so each rank's engine holds its shards (host store, device slots, CPU work) and the
all-reduce after the MoE layer sums them. Routing is replicated, so every rank must decide the
same placement from the same counts; the ranks of one machine divide its cores."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TensorParallelRank:
    rank: int = 0
    size: int = 1
    local_ranks: int = 1  # ranks sharing this machine's host memory and cores

    def __post_init__(self) -> None:
        if not (0 <= self.rank < self.size and 1 <= self.local_ranks <= self.size):
            raise ValueError(f"rank {self.rank} of {self.size} with {self.local_ranks} on this machine")

    @property
    def in_lockstep(self) -> bool:
        """Whether other ranks must reach the same placement at the same step (no decision may
        depend on this rank's timing, such as which copies have landed)."""
        return self.size > 1

    def to_dict(self) -> dict[str, int]:
        return asdict(self)
