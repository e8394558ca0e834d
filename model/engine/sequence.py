"""Sequence: the state of one sample being generated (tokens, KV blocks, sampling state, text).

A request with n samples starts as ONE sequence (n_fork = n). Its prompt is prefilled once; when the prefill
finishes, the engine forks it into n sequences that share the prompt's KV blocks (block_manager.fork), each
with its own sample index and generator. After that each sequence is independent (preempted, finished alone).
`num_computed` counts tokens whose K/V are in the cache; the tokens after it are fed on the next steps.
"""

import itertools
from enum import Enum, auto

from .sampler import SeedStream
from .sampling_params import SamplingParams


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


_ids = itertools.count()


def sample_seed(seed: int, index: int) -> int:
    """Seed of sample `index` of a request seeded with `seed` (distinct streams, fits in int64)."""
    return (seed * 1_000_003 + index * 7_919 + 1) % (2**63 - 1)


class Sequence:
    def __init__(self, request_id: int, token_ids: list[int], params: SamplingParams, index: int = 0):
        self.seq_id = next(_ids)             # increasing: larger = newer (preempted first)
        self.request_id = request_id
        self.index = index                   # sample index within the request
        self.params = params
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.num_computed = 0                # tokens whose K/V are written in the cache
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []    # prefix-cache hashes of the leading full blocks
        self.status = Status.WAITING
        self.n_fork = params.n if index == 0 else 1
        self.generator: SeedStream | None = None   # own random stream when the request is seeded
        self.logprobs: list[dict] = []       # {token_id: Logprob} per generated token (params.logprobs not None)
        self.cumulative_logprob = 0.0
        self.routing = None                  # [len - 1, L, K] device tensor at finish (params.return_routing)
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.final_text: str | None = None   # the completion's text, set when it finishes
        self.text = ""                       # detokenized completion so far (with a tokenizer)
        self.prefix_offset = max(0, self.num_prompt_tokens - 5)  # incremental detokenizer state (vLLM's)
        self.read_offset = self.num_prompt_tokens
        self.num_preemptions = 0
        self.stopped_by_string = False
        self.num_emitted = 0                 # characters of .text already streamed

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the cache: 1 while decoding, more while (re)prefilling."""
        return len(self.token_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def make_generator(self) -> None:
        if self.params.seed is not None and self.generator is None:
            self.generator = SeedStream(sample_seed(self.params.seed, self.index))

    def fork(self, index: int) -> "Sequence":
        """A sibling sample sharing this sequence's tokens and (by reference count) its blocks."""
        child = Sequence(self.request_id, self.token_ids[: self.num_prompt_tokens], self.params, index)
        child.token_ids = list(self.token_ids)
        child.num_computed = self.num_computed
        child.block_table = list(self.block_table)
        child.block_hashes = list(self.block_hashes)
        child.status = self.status
        return child

    def append(self, token_id: int, logprobs: dict | None = None, value: float = 0.0) -> None:
        """Add a generated token; with its log-prob dict and value when the request asked for log-probs."""
        self.token_ids.append(token_id)
        if logprobs is not None:
            self.logprobs.append(logprobs)
            self.cumulative_logprob += value

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id}, idx={self.index}, len={len(self)}, "
                f"computed={self.num_computed}, blocks={self.block_table}, {self.status.name})")
