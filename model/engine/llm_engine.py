"""LLM: the engine users call — `LLM(model).generate(prompts, SamplingParams(...))`, `.chat(...)`, `.stream(...)`.

One step = schedule (scheduler.py) -> copy-on-write block copies -> forward over the paged cache
(model_runner.py) -> sample (sampler.py) -> append tokens, detokenize, check stops, free finished sequences.
The step's only host sync is the read of the sampled tokens (with their log-probs, in the same transfer).
A request with n samples is prefilled once and forked into n sequences sharing its prompt blocks; decode steps
read those shared blocks once per group (cascade decode; `cascade=False` turns it off).
`step()` is two halves: `compute_step()` (schedule, forward, sample: no tokenizer) and `process_step()`
(bookkeeping, detokenization, stops); AsyncLLM (async_llm.py) runs the first in a worker thread.
MoE models record, per fed token and MoE layer, the experts it was routed to (beside its K/V, on the device);
`SamplingParams(return_routing=True)` returns them as `CompletionOutput.routing` (routing replay for RL).

`model` is a checkpoint directory (loaded with MoEForCausalLM.from_pretrained, tokenizer with AutoTokenizer
when the directory has one, generation_config.json for default sampling and EOS ids) or a model object used in
place — e.g. the GRPO trainer's live MoEForCausalLM, no copy. Anything with the engine contract (model/README.md)
works, e.g. mock_model.py.

`tensor_parallel_size=N` (with `enable_expert_parallel=True` for the experts) runs SPMD under
`torchrun --nproc-per-node N`: every rank builds the same LLM and calls the same methods with the same inputs, loads
only its slices of the checkpoint (model/parallel.py) and returns the same outputs (rank 0's sampled tokens are
broadcast each step). `enable_dp_attention=True` (SGLang's name) makes attention data-parallel instead of
heads-split: each rank serves its share of the prompts with its own KV cache (generate / chat).

A request that cannot be served (prompt too long for max_model_len or the KV cache, n > max_num_seqs, token
ids outside the vocabulary, ...) fails alone: `generate` returns it with finish_reason "error" and the message
in RequestOutput.error, and serves the others; `add_request` raises RequestError. Wrong argument types raise
TypeError naming the argument before anything is queued.

KV cache on CUDA: `gpu_memory_fraction` of the memory free for the cache (torch.cuda.mem_get_info after the weights
and a profiling forward; see kv_cache_blocks), so other processes, the CUDA context and a trainer's state count.
`sleep(level)` / `wake_up(tags)` (vLLM's names) free and restore the KV cache, the CUDA graphs and the weights.
"""

import json
import logging
import numbers
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .block_manager import BlockManager
from .chat import render_chat
from .checks import RequestError, check_float, check_int, check_token_ids
from .detokenizer import decode_step, final_text, find_stop, stop_cut
from .logits_processors import RowContext, bad_words_ids
from .model_runner import ModelRunner, logits_starts
from .outputs import CompletionOutput, Logprob, RequestOutput, StreamEvent
from .sampler import Sampler, SamplerOutput, to_device
from .sampling_params import LOGPROBS_MODES, SamplingParams
from .scheduler import Batch, Scheduler
from .sequence import Sequence

log = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
HostRow = tuple[int, float, "int | None", list[int], list[float]]  # SamplerOutput.to_host() row
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}


@dataclass
class Request:
    request_id: int
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    samples: dict[int, Sequence] = field(default_factory=dict)
    num_finished: int = 0
    bad_words: list[list[int]] = field(default_factory=list)  # token ids of params.bad_words
    prompt_lps: dict[int, HostRow] = field(default_factory=dict)  # prompt position -> its log-prob row
    stream_text: bool = False    # detokenize every token (streaming), not only at the end


@dataclass
class StepWork:
    """What compute_step hands to process_step: the sampled sequences and their host rows."""
    seqs: list[Sequence]
    rows: list[HostRow]


@dataclass
class EngineStats:
    steps: int = 0
    decode_steps: int = 0
    prompt_tokens: int = 0       # tokens fed through the model that were not one-token decode rows
    decode_tokens: int = 0
    step_log: list[tuple[int, int, int, int]] | None = None  # (new tokens, seqs, sum kv len, sum q*kv) per step


class LLM:
    def __init__(self, model, *, dtype: torch.dtype | None = None, device=None, tokenizer=None,
                 num_blocks: int | None = None, block_size: int = 64, gpu_memory_fraction: float = 0.9,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192, max_model_len: int | None = None,
                 enable_prefix_caching: bool = False, enforce_eager: bool = False, seed: int = 0,
                 cpu_kv_cache_gib: float = 1.0, record_steps: bool = False, record_routing: bool | None = None,
                 generation_config: str | None = "auto", logprobs_mode: str = "raw_logprobs", max_logprobs: int = 20,
                 allow_long_max_model_len: bool = False, cascade: bool = True, tensor_parallel_size: int = 1,
                 enable_expert_parallel: bool = False, enable_dp_attention: bool = False,
                 kv_cache_dtype: str = "auto"):
        """record_routing: keep each cached token's experts per MoE layer (needed by return_routing; None = on for
        models with MoE layers; costs L * top_k int16 per cache slot and one small write per MoE layer per step).
        generation_config: "auto" reads the checkpoint's generation_config.json (default sampling values, EOS ids),
        None / "vllm" ignores it, or a path. logprobs_mode: the default distribution of returned log-probs
        (sampling_params.py). max_logprobs: the most top log-probs a request may ask for (-1: no limit).
        allow_long_max_model_len: accept a max_model_len beyond max_position_embeddings (with a warning).
        cascade: decode steps read prompt blocks shared by several samples once per group (shared-prefix decode).
        tensor_parallel_size / enable_expert_parallel / enable_dp_attention: module docstring (model/parallel.py).
        kv_cache_dtype: "auto" (the model's dtype) or "fp8" (MLA models: e4m3 latent rows with a per-token scale,
        half the bytes of bf16: twice the tokens in the cache, half the KV bytes per decode step)."""
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: expected one of {list(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
        self.kv_dtype = KV_CACHE_DTYPES[kv_cache_dtype]
        _check_engine_args(num_blocks=num_blocks, block_size=block_size, gpu_memory_fraction=gpu_memory_fraction,
                           max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, seed=seed,
                           cpu_kv_cache_gib=cpu_kv_cache_gib, logprobs_mode=logprobs_mode, max_logprobs=max_logprobs)
        check_int("tensor_parallel_size", tensor_parallel_size, 1)
        self.parallel = None  # tensor / expert parallel (model/parallel.py): SPMD under torchrun
        src = str(model) if isinstance(model, (str, os.PathLike)) else None  # tokenizer, generation config
        if tensor_parallel_size > 1:
            model, device = _parallel_model(model, dtype, device, tensor_parallel_size, enable_expert_parallel,
                                            enable_dp_attention)
            self.parallel = model.parallel
            if enable_dp_attention and not enforce_eager and torch.device(device).type == "cuda":
                log.warning("enable_dp_attention: decode runs without CUDA graphs (the ranks' batch sizes differ "
                            "from step to step; padding every rank to the largest is not implemented)")
                enforce_eager = True
        self.model, path = _load_model(model, dtype, device)
        path = path or src
        moe_layers = int(getattr(self.model, "num_moe_layers", 0) or 0)
        if record_routing and not moe_layers:
            raise ValueError("record_routing: the model has no MoE layers (no num_moe_layers) to record")
        self.record_routing = bool(moe_layers) if record_routing is None else bool(record_routing)
        self.tokenizer = _load_tokenizer(tokenizer, path)
        self.device = torch.device(self.model.device)
        cfg = self.model.config
        self.max_model_len = _max_model_len(max_model_len, cfg, allow_long_max_model_len)
        self.max_num_seqs = max_num_seqs
        if num_blocks is None:
            num_blocks = self._auto_num_blocks(block_size, gpu_memory_fraction, max_num_batched_tokens,
                                               max_num_seqs, cpu_kv_cache_gib)
            if self.parallel is not None and not self.parallel.dp_attention:  # identical schedulers: same cache
                from ..parallel import min_over_ranks
                num_blocks = min_over_ranks(num_blocks, self.device, self.parallel)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max(max_num_batched_tokens, max_num_seqs))
        self.runner = ModelRunner(self.model, num_blocks=num_blocks, block_size=block_size,
                                  max_model_len=self.max_model_len, max_num_seqs=max_num_seqs,
                                  enforce_eager=enforce_eager, record_routing=self.record_routing,
                                  cascade=cascade, kv_dtype=self.kv_dtype)
        self.sampler = Sampler(seed)
        self.generation_defaults, generation_eos = _generation_config(generation_config, path)
        self.eos_ids = _eos_ids(cfg, self.tokenizer) | generation_eos
        self.logprobs_mode, self.max_logprobs = logprobs_mode, max_logprobs
        self.requests: dict[int, Request] = {}
        self.finished: dict[int, RequestOutput] = {}
        self.stats = EngineStats(step_log=[] if record_steps else None)
        self._next_id = 0
        self._token_text: dict[int, str] = {}
        self.sleeping: dict[str, int] = {}  # what sleep() freed and at which level (empty: awake)

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the checkpoint's generation_config.json recommendations (temperature, top_p,
        top_k, min_p, repetition_penalty, max_new_tokens -> max_tokens) — what `generate(prompts)` uses."""
        return SamplingParams(**self.generation_defaults)

    # ---- requests ------------------------------------------------------------------------------------------------
    def _encode(self, prompt, name: str) -> tuple[str | None, list[int]]:
        """A prompt (string, token ids, 1-D integer tensor, or {"prompt": str} / {"prompt_token_ids": [...]})
        -> (text or None, token ids)."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), check_token_ids(f"{name}['prompt_token_ids']",
                                                             prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self._encode(prompt["prompt"], f"{name}['prompt']")
            raise TypeError(f"{name}: a dict prompt needs 'prompt' or 'prompt_token_ids', got keys {list(prompt)}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(f"{name}: a string prompt needs a tokenizer; pass token ids or tokenizer=")
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, torch.Tensor):
            if prompt.ndim != 1 or prompt.dtype.is_floating_point or prompt.dtype.is_complex:
                raise TypeError(f"{name}: a tensor prompt must be 1-D integer token ids, got {prompt.dtype} "
                                f"{tuple(prompt.shape)}")
            prompt = prompt.tolist()
        elif hasattr(prompt, "tolist") and hasattr(prompt, "dtype"):   # a numpy array of ids
            prompt = prompt.tolist()
        if prompt is None or not isinstance(prompt, (list, tuple)):
            raise TypeError(f"{name}: expected a string, a list of token ids or a dict, got "
                            f"{type(prompt).__name__} {prompt!r}")
        return None, check_token_ids(name, prompt)

    def _make_request(self, prompt, params: SamplingParams | None, name: str = "prompt") -> Request:
        """Validate one prompt + params; raises TypeError (wrong types) or RequestError (cannot be served)."""
        if self.sleeping:
            raise RuntimeError(f"the engine is asleep ({', '.join(self.sleeping)} freed): call wake_up() first")
        params = self.get_default_sampling_params() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params: expected SamplingParams or None, got {type(params).__name__}")
        text, ids = self._encode(prompt, name)
        k = params.truncate_prompt_tokens
        if k is not None:
            ids = ids[-(self.max_model_len - 1 if k == -1 else k):]
        self._check_request(ids, params, name)
        bad = bad_words_ids(self.tokenizer, params.bad_words, self.model.config.vocab_size) if params.bad_words \
            else []
        rid, self._next_id = self._next_id, self._next_id + 1
        return Request(rid, text, ids, params, bad_words=bad)

    def _check_request(self, ids: list[int], params: SamplingParams, name: str) -> None:
        V, bm = self.model.config.vocab_size, self.block_manager
        if not ids:
            raise RequestError(f"{name}: an empty prompt")
        if min(ids) < 0 or max(ids) >= V:
            raise RequestError(f"{name}: token ids must lie in [0, {V}), got {min(ids)}..{max(ids)}")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"{name}: {len(ids)} tokens leave no room under max_model_len={self.max_model_len}"
                               " (SamplingParams.truncate_prompt_tokens keeps the last k)")
        new = params.max_tokens if params.max_tokens is not None else self.max_model_len
        need = bm.blocks_for(min(len(ids) + new, self.max_model_len))
        if need > bm.num_blocks:
            raise RequestError(f"{name}: a {len(ids)}-token prompt + {new} new tokens needs {need} KV blocks, "
                               f"the cache has {bm.num_blocks}")
        if params.n > self.max_num_seqs:
            raise RequestError(f"sampling_params.n: {params.n} samples exceed max_num_seqs={self.max_num_seqs}")
        if params.stop_list and (self.tokenizer is None or not params.detokenize):
            raise RequestError("sampling_params.stop: stop strings need a tokenizer and detokenize=True "
                               "(use stop_token_ids)")
        if params.bad_words and self.tokenizer is None:
            raise RequestError("sampling_params.bad_words: bad words need a tokenizer")
        for what in ("logprobs", "prompt_logprobs"):
            k = getattr(params, what)
            if k is not None and self.max_logprobs != -1 and (k == -1 or k > self.max_logprobs):
                raise RequestError(f"sampling_params.{what}: {k} exceeds max_logprobs={self.max_logprobs} "
                                   "(LLM(max_logprobs=...), -1: no limit)")
        if params.logit_bias and max(params.logit_bias) >= V:
            raise RequestError(f"sampling_params.logit_bias: token id {max(params.logit_bias)} is outside the "
                               f"vocabulary [0, {V})")
        if params.return_routing and self.runner.routing is None:
            raise RequestError("sampling_params.return_routing: this engine records no routing (a model without "
                               "MoE layers, or LLM(record_routing=False))")

    def _enqueue(self, req: Request, stream_text: bool = False) -> int:
        req.stream_text = stream_text
        seq = Sequence(req.request_id, req.prompt_ids, req.params, 0)
        seq.make_generator()
        req.samples[0] = seq
        self.requests[req.request_id] = req
        self.scheduler.add(seq)
        return req.request_id

    def _fail(self, prompt, params: SamplingParams | None, err: Exception) -> int:
        """Record a request that cannot be served as finished with finish_reason "error"; returns its id."""
        rid, self._next_id = self._next_id, self._next_id + 1
        n = params.n if isinstance(params, SamplingParams) else 1
        ids = prompt if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) else []
        outs = [CompletionOutput(i, None, [], finish_reason="error") for i in range(n)]
        self.finished[rid] = RequestOutput(rid, prompt if isinstance(prompt, str) else None, ids, outs,
                                           error=str(err))
        log.warning("request %d not served: %s", rid, err)
        return rid

    def add_request(self, prompt, params: SamplingParams | None = None) -> int:
        """Queue one prompt (string or token ids); returns its request id. Run `step()` to make progress.
        Raises RequestError when the request cannot be served."""
        return self._enqueue(self._make_request(prompt, params))

    def abort(self, request_id: int) -> None:
        """Drop a request (all its samples) and free its blocks; unknown or finished ids are ignored."""
        req = self.requests.pop(request_id, None)
        for seq in req.samples.values() if req else ():
            if not seq.is_finished:
                self.scheduler.abort(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- sleep mode (vLLM's names): hand the memory to a trainer between rollouts ----------------------------------
    def sleep(self, level: int = 1) -> None:
        """Free the KV cache and the CUDA graphs; level 1 also moves the weights to host memory, level 2 discards
        them (wake_up then gives uninitialised weights that the caller loads, e.g. a trainer's new policy). Every
        request must be finished. The number of cache blocks is kept, so a woken engine schedules as before."""
        if level not in (1, 2):
            raise ValueError(f"level: 1 (offload weights) or 2 (discard weights), got {level}")
        if self.has_unfinished():
            raise RuntimeError("sleep: requests are still running")
        if self.sleeping:
            raise RuntimeError("sleep: the engine is already asleep")
        self.block_manager.reset_prefix_cache()  # cached blocks would point into the freed cache
        self.runner.release()
        if level == 1:
            self.model.to("cpu")
        else:
            self.model.to_empty(device="meta")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.sleeping = {"weights": level, "kv_cache": level}

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Undo sleep: tags "weights" (back from host memory after level 1; allocated, uninitialised after level 2)
        and/or "kv_cache" (the cache re-allocated with the same number of blocks, CUDA graphs re-captured). Waking
        the weights first lets a caller load new weights before the cache takes its memory (vLLM's order)."""
        tags = list(tags) if tags is not None else ["weights", "kv_cache"]
        bad = [t for t in tags if t not in ("weights", "kv_cache")]
        if bad:
            raise ValueError(f"tags: 'weights' and/or 'kv_cache', got {bad}")
        if "weights" in tags and "weights" in self.sleeping:
            level = self.sleeping.pop("weights")
            if level == 1:
                self.model.to(self.device)
            else:
                self.model.to_empty(device=self.device)
            if hasattr(self.model, "tie_weights"):
                self.model.tie_weights()
        if "kv_cache" in tags and "kv_cache" in self.sleeping:
            if "weights" in self.sleeping:
                raise RuntimeError("wake_up: wake the weights before the KV cache (graphs capture the weights)")
            del self.sleeping["kv_cache"]
            self.runner.allocate()

    def reset_prefix_cache(self) -> None:
        """Drop cached prompt blocks; call after changing the model's weights (e.g. a GRPO optimizer step)
        when enable_prefix_caching=True, between generate calls."""
        if self.has_unfinished():
            raise RuntimeError("reset_prefix_cache: requests are still running")
        self.block_manager.reset_prefix_cache()

    # ---- one engine step -----------------------------------------------------------------------------------------
    def step(self) -> list[StreamEvent]:
        return self.process_step(self.compute_step())

    def compute_step(self) -> StepWork:
        """Schedule, run the model, sample: the half of a step that touches the device (never the tokenizer)."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self.has_unfinished():
                raise RuntimeError("scheduler: no sequence could be scheduled (KV cache too small?)")
            return StepWork([], [])
        self._mark_prompt_logits(batch)
        self.runner.copy_blocks(batch.copies)
        logits = self.runner.run(batch)                                   # [M, V]
        self._record(batch)
        starts = logits_starts(batch)
        if batch.all_logits:
            self._prompt_logprobs(batch, logits, starts)
        rows, seqs = self._advance(batch, starts)
        if not seqs:
            return StepWork([], [])
        rows_t = to_device(rows, torch.int64, logits.device)
        params = [s.params for s in seqs]
        contexts = [self._context(s) for s in seqs] if any(p.needs_context for p in params) else None
        out = self.sampler(logits[rows_t], params, [s.generator for s in seqs], contexts,
                           [p.logprobs_mode or self.logprobs_mode for p in params])
        if self.parallel is not None and not self.parallel.dp_attention:  # SPMD: every rank takes rank 0's tokens
            from ..parallel import broadcast_from_rank0
            broadcast_from_rank0(out, self.parallel)
        return StepWork(seqs, out.to_host())                              # the step's one host sync

    def process_step(self, work: StepWork) -> list[StreamEvent]:
        """Append the sampled tokens, detokenize, check stops, finish samples and requests."""
        return [self._append(s, *row) for s, row in zip(work.seqs, work.rows)]

    def _advance(self, batch: Batch, starts: list[int]) -> tuple[list[int], list[Sequence]]:
        """Mark the fed tokens computed; fork finished n-sample prefills; pick the logits rows to sample from."""
        rows, seqs = [], []
        for b, (seq, k) in enumerate(zip(batch.seqs, batch.num_new)):
            seq.num_computed += k
            self.block_manager.seal(seq)
            if seq.num_computed < len(seq):        # a prefill chunk that is not the last one
                continue
            group = [seq] + (self._fork(seq) if seq.n_fork > 1 else [])
            rows += [starts[b + 1] - 1] * len(group)
            seqs += group
        return rows, seqs

    def _fork(self, seq: Sequence) -> list[Sequence]:
        children = [seq.fork(i) for i in range(1, seq.n_fork)]
        seq.n_fork = 1
        req = self.requests[seq.request_id]
        for child in children:
            child.make_generator()
            req.samples[child.index] = child
        self.scheduler.fork(children)
        return children

    def _context(self, seq: Sequence) -> RowContext | None:
        p = seq.params
        if not p.needs_context:
            return None
        V, P = self.model.config.vocab_size, seq.num_prompt_tokens
        stop = [t for t in ([] if p.ignore_eos else sorted(self.eos_ids)) + p.stop_token_ids if t < V]
        return RowContext(seq.token_ids[:P], seq.token_ids[P:], self.requests[seq.request_id].bad_words, stop)

    # ---- prompt log-probs ----------------------------------------------------------------------------------------
    def _mark_prompt_logits(self, batch: Batch) -> None:
        """Ask the runner for every new token's logits of sequences still owing prompt log-probs."""
        if all(s.params.prompt_logprobs is None for s in batch.seqs):
            return
        batch.all_logits = [s.params.prompt_logprobs is not None and s.num_computed < s.num_prompt_tokens - 1
                            and len(self.requests[s.request_id].prompt_lps) < s.num_prompt_tokens - 1
                            for s in batch.seqs]

    def _prompt_logprobs(self, batch: Batch, logits: torch.Tensor, starts: list[int]) -> None:
        """Raw log-probs of the prompt tokens this step's logits predict (position p's logits -> token p + 1)."""
        rows, targets, keys = [], [], []
        for b, seq in enumerate(batch.seqs):
            if not batch.all_logits[b]:
                continue
            req, a = self.requests[seq.request_id], seq.num_computed
            for j, p in enumerate(range(a, min(a + batch.num_new[b], seq.num_prompt_tokens - 1))):
                if p + 1 not in req.prompt_lps:
                    rows.append(starts[b] + j)
                    targets.append(seq.token_ids[p + 1])
                    keys.append((req, p + 1))
        if not rows:
            return
        lp = logits[to_device(rows, torch.int64, logits.device)].float().log_softmax(dim=-1)   # [R, V]
        tok = to_device(targets, torch.int64, logits.device)
        value = lp.gather(-1, tok[:, None])[:, 0]                                               # [R]
        ks = [lp.shape[-1] if r.params.prompt_logprobs == -1 else r.params.prompt_logprobs for r, _ in keys]
        top = lp.topk(max(ks), dim=-1) if max(ks) else (None, None)
        out = SamplerOutput(tok, value, (lp > value[:, None]).sum(dim=-1) + 1, top[1], top[0]).to_host()
        for (req, pos), k, (t, v, r, ids, vals) in zip(keys, ks, out):
            req.prompt_lps[pos] = (t, v, r, ids[:k], vals[:k])

    # ---- bookkeeping of one sampled token ------------------------------------------------------------------------
    def _append(self, seq: Sequence, token: int, value: float, rank: int | None, top_ids: list[int],
                top_values: list[float]) -> StreamEvent:
        p = seq.params
        entry = None
        if p.logprobs is not None:
            k = len(top_ids) if p.logprobs == -1 else p.logprobs
            entry = self._logprob_dict(token, value, rank, top_ids[:k], top_values[:k])
        seq.append(token, entry, value)
        piece = ""
        detok = self.tokenizer is not None and p.detokenize
        if detok and (p.stop_list or self.requests[seq.request_id].stream_text):
            piece = decode_step(self.tokenizer, seq)
        reason = self._finish_reason(seq, token, piece)
        if reason is not None:
            seq.finish_reason = reason
            seq.final_text = final_text(self.tokenizer, seq, p.stop_list)
            if p.return_routing:  # before its blocks (and their recorded experts) are freed
                seq.routing = self.runner.gather_routing(seq)
        text = self._emit_text(seq, reason is not None) if detok else None
        if reason is not None:
            self.scheduler.finish(seq)
            self._finish_sample(seq)
        return StreamEvent(seq.request_id, seq.index, token, value if entry is not None else None, text, reason,
                           entry, seq.stop_reason)

    def _token_str(self, token: int) -> str | None:
        if self.tokenizer is None:
            return None
        s = self._token_text.get(token)
        if s is None:
            s = self._token_text[token] = self.tokenizer.decode([token])
        return s

    def _logprob_dict(self, token: int, value: float, rank: int | None, ids: list[int],
                      values: list[float]) -> dict[int, Logprob]:
        """{token: Logprob} for the chosen token first, then the top-k (ranks 1..k) — vLLM's layout."""
        out = {token: Logprob(value, rank, self._token_str(token))}
        for r, (t, v) in enumerate(zip(ids, values)):
            if t not in out:
                out[t] = Logprob(v, r + 1, self._token_str(t))
        return out

    @staticmethod
    def _emit_text(seq: Sequence, final: bool) -> str:
        """Streamed text: hold back the last (longest stop - 1) characters, which a stop string may still cut.
        The last piece completes the final text, so the streamed pieces always add up to CompletionOutput.text."""
        if final and seq.final_text is not None and seq.final_text.startswith(seq.text[:seq.num_emitted]):
            out = seq.final_text[seq.num_emitted:]
            seq.num_emitted = len(seq.final_text)
            return out
        hold = 0 if final or not seq.params.stop_list else max(map(len, seq.params.stop_list)) - 1
        end = max(seq.num_emitted, len(seq.text) - hold)
        out, seq.num_emitted = seq.text[seq.num_emitted:end], end
        return out

    def _finish_reason(self, seq: Sequence, token: int, piece: str) -> str | None:
        p, n = seq.params, seq.num_completion_tokens
        if n >= p.min_tokens:
            if token in self.eos_ids and not p.ignore_eos:
                return "stop"
            if token in p.stop_token_ids:
                seq.stop_reason = token
                return "stop"
        if p.stop_list and piece and n > p.min_tokens:
            i, s = find_stop(seq.text, piece, p.stop_list)
            if i >= 0:
                seq.text = seq.text[:stop_cut(i, s, p)]
                seq.stopped_by_string, seq.stop_reason = True, s
                return "stop"
        if (p.max_tokens is not None and n >= p.max_tokens) or len(seq) >= self.max_model_len:
            return "length"
        return None

    def _finish_sample(self, seq: Sequence) -> None:
        req = self.requests[seq.request_id]
        req.num_finished += 1
        if req.num_finished < req.params.n:
            return
        del self.requests[req.request_id]
        lp = req.params.logprobs is not None
        outs = [CompletionOutput(s.index, s.final_text, s.completion_ids, s.cumulative_logprob if lp else None,
                                 list(s.logprobs) if lp else None, s.finish_reason, s.stop_reason,
                                 s.num_preemptions, routing=s.routing)
                for s in sorted(req.samples.values(), key=lambda s: s.index)]
        self.finished[req.request_id] = RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs,
                                                      self._prompt_logprob_list(req))

    def _prompt_logprob_list(self, req: Request) -> list[dict[int, Logprob] | None] | None:
        if req.params.prompt_logprobs is None:
            return None
        rows = (req.prompt_lps.get(pos) for pos in range(1, len(req.prompt_ids)))
        return [None] + [None if r is None else self._logprob_dict(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    def _record(self, batch: Batch) -> None:
        st = self.stats
        st.steps += 1
        if batch.is_decode:
            st.decode_steps += 1
            st.decode_tokens += batch.num_tokens
        else:
            st.prompt_tokens += batch.num_tokens
        if st.step_log is not None:
            lens = [s.num_computed + k for s, k in zip(batch.seqs, batch.num_new)]
            st.step_log.append((batch.num_tokens, len(lens), sum(lens),
                                sum(k * L for k, L in zip(batch.num_new, lens))))

    # ---- user API ------------------------------------------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (strings, token-id lists, or {"prompt"/"prompt_token_ids": ...} dicts); one
        RequestOutput per prompt, in order. `sampling_params=None`: get_default_sampling_params()."""
        if self.parallel is not None and self.parallel.dp_attention:
            from ..parallel import dp_generate
            return dp_generate(self, prompts, sampling_params)
        ids = self._add_all(prompts, sampling_params)
        bar = _progress(len(ids), use_tqdm)
        pending = {i for i in ids if i in self.requests}
        bar.update(len(ids) - len(pending))
        while pending:
            for ev in self.step():
                if ev.finish_reason is not None and ev.request_id in self.finished and ev.request_id in pending:
                    pending.discard(ev.request_id)
                    bar.update(1)
        bar.close()
        return [self.finished.pop(i) for i in ids]

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
             use_tqdm: bool = True, chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} messages) or to a list of them,
        rendered with the tokenizer's chat template (or `chat_template`: a Jinja string or a file) and tokenized
        once — the template's own BOS, no second one."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise TypeError(f"messages: expected a conversation (a list of message dicts) or a list of them, got "
                            f"{type(messages).__name__} {messages!r}"[:300])
        convs = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = []
        for i, conv in enumerate(convs):
            text, ids = render_chat(self.tokenizer, conv, chat_template=chat_template,
                                    add_generation_prompt=add_generation_prompt,
                                    continue_final_message=continue_final_message,
                                    chat_template_kwargs=chat_template_kwargs, name=f"messages[{i}]")
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def stream(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
               ) -> Iterator[StreamEvent]:
        """Yield a StreamEvent for every new token of every sample, as the steps produce them. With a tokenizer
        each event carries the text it completed (stop strings cut). A request that cannot be served yields one
        event per sample with finish_reason "error"."""
        if self.parallel is not None and self.parallel.dp_attention:
            raise NotImplementedError("stream: not available with enable_dp_attention (use generate)")
        ids = self._add_all(prompts, sampling_params, stream_text=True)
        live = set()
        for i in ids:
            failed = self.finished.pop(i) if i not in self.requests else None
            if failed is None:
                live.add(i)
            for o in failed.outputs if failed else ():
                yield StreamEvent(i, o.index, None, None, None, "error", error=failed.error)
        try:
            while any(i in self.requests for i in live):
                yield from (ev for ev in self.step() if ev.request_id in live)
        finally:  # also when the caller stops iterating early: its unfinished requests are aborted
            for i in live:
                self.abort(i)
                self.finished.pop(i, None)

    def _add_all(self, prompts, params, stream_text: bool = False) -> list[int]:
        prompts = _as_prompt_list(prompts)
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"sampling_params: {len(plist)} SamplingParams for {len(prompts)} prompts")
        made = []                                    # validate all before queueing any
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            try:
                made.append(self._make_request(p, sp, f"prompts[{i}]"))
            except RequestError as e:
                made.append((p, sp, e))
        return [self._enqueue(r, stream_text) if isinstance(r, Request) else self._fail(*r) for r in made]

    # ---- sizing ---------------------------------------------------------------------------------------------------
    def _auto_num_blocks(self, block_size: int, fraction: float, max_tokens: int, max_seqs: int,
                         cpu_gib: float) -> int:
        extra = {"routing": True} if self.record_routing else {}
        if self.kv_dtype is not None:
            extra["dtype"] = self.kv_dtype
        per_block = self.model.kv_cache_bytes_per_block(block_size, **extra)
        if self.device.type != "cuda":
            return max(1, int(cpu_gib * 2**30) // per_block)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"gpu_memory_fraction: must be in (0, 1], got {fraction}")
        return kv_cache_blocks(self.model, per_block, block_size, fraction, min(max_tokens, self.max_model_len - 1),
                               max_seqs, self.device)


def kv_cache_blocks(model, per_block: int, block_size: int, fraction: float, profile_tokens: int, max_seqs: int,
                    device) -> int:
    """KV-cache blocks for `fraction` of the GPU memory FREE FOR THE CACHE, measured, not assumed: after the weights
    are in place, a profiling forward (the largest prefill step) gives the activation peak; then
    torch.cuda.mem_get_info() (which sees every process on the device, the CUDA context and NCCL buffers) gives the
    free memory, from which the activation peak, the sampler's temporaries and the decode CUDA graphs' pool (about
    the activation peak scaled to max_seqs tokens) are kept back. fraction < 1 leaves the rest as headroom.
    per_block: bytes of one cache block (with the routing record when the engine keeps one)."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    act = _profile_forward(model, profile_tokens, block_size) - base
    graphs = act * min(1.0, max_seqs / max(profile_tokens, 1))
    reserve = 8 * max_seqs * model.config.vocab_size * 4                # logits + sampler temporaries
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()                                             # cached but unused blocks count as free
    free, _ = torch.cuda.mem_get_info(device)
    avail = free - act - graphs - reserve
    n = int(fraction * avail // per_block)
    if n < 1:
        raise RuntimeError(f"gpu_memory_fraction={fraction}: no memory free for the KV cache ({free / 2**30:.2f} GiB "
                           f"free after the weights, activations {act / 2**30:.2f} GiB, graphs ~{graphs / 2**30:.2f} "
                           f"GiB, sampler {reserve / 2**30:.2f} GiB)")
    return n


def _profile_forward(model, T: int, block_size: int) -> int:
    """Peak bytes allocated while prefilling one T-token sequence (the largest step) into a scratch cache."""
    from ..meta import ForwardMeta

    dev = torch.device(model.device)
    nb = -(-T // block_size)
    cache = model.allocate_kv_cache(nb, block_size, device=dev)
    torch.cuda.reset_peak_memory_stats(dev)
    pos = torch.arange(T, device=dev)
    meta = ForwardMeta(input_ids=torch.zeros(T, dtype=torch.int64, device=dev), positions=pos,
                       cu_seqlens_q=torch.tensor([0, T], dtype=torch.int32, device=dev),
                       seq_lens=torch.tensor([T], dtype=torch.int32, device=dev),
                       block_tables=torch.arange(nb, dtype=torch.int32, device=dev)[None],
                       slot_mapping=pos, logits_indices=torch.tensor([T - 1], device=dev), is_decode=False)
    with torch.inference_mode():
        model.forward_paged(meta, cache)
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    del cache
    torch.cuda.empty_cache()
    return peak


def _parallel_model(model, dtype, device, tp: int, ep: bool, dp_attention: bool):
    """Join the process group and load this rank's part of the checkpoint (model/parallel.py)."""
    from ..parallel import ParallelConfig, init_distributed

    rank, device = init_distributed(tp, device)
    pc = ParallelConfig(world=tp, rank=rank, expert_parallel=ep, dp_attention=dp_attention)
    if isinstance(model, (str, os.PathLike)):
        from ..modeling import MoEForCausalLM

        return MoEForCausalLM.from_pretrained(str(model), dtype=dtype, device=device, parallel=pc), device
    have = getattr(model, "parallel", None)
    if have is None or (have.world, have.rank, have.expert_parallel, have.dp_attention) != (tp, rank, ep,
                                                                                          dp_attention):
        raise ValueError(f"model: tensor_parallel_size={tp} needs a checkpoint path (each rank loads its slices) or "
                         "a model built with model.parallel.parallelize for this rank")
    return model, device


def _load_model(model, dtype, device):
    if isinstance(model, (str, os.PathLike)):
        from ..modeling import MoEForCausalLM

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return MoEForCausalLM.from_pretrained(str(model), dtype=dtype, device=device), str(model)
    for name in ("config", "forward_paged", "allocate_kv_cache", "kv_cache_bytes_per_block"):
        if not hasattr(model, name):
            raise TypeError(f"model: expected a checkpoint path or a model with .{name} (see MoEForCausalLM)")
    if dtype is not None and dtype != model.dtype:
        raise ValueError(f"dtype: the model is used in place (no copy) and is {model.dtype}, not {dtype}")
    if device is not None and torch.device(device) != torch.device(model.device):
        raise ValueError(f"device: the model is used in place (no copy) and is on {model.device}, not {device}")
    return model, None


def _load_tokenizer(tokenizer, path: str | None):
    if tokenizer is None and path and any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        tokenizer = path
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer))
    return tokenizer


def _eos_ids(config, tokenizer) -> set[int]:
    eos = getattr(config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _as_prompt_list(prompts) -> list:
    """prompts as a list of single prompts: a string, dict, 1-D tensor or flat list of numbers is ONE prompt."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, torch.Tensor) and prompts.ndim != 2):
        return [prompts]
    if prompts is None or not hasattr(prompts, "__iter__"):
        raise TypeError(f"prompts: expected a string, token ids, a dict or a list of those, got "
                        f"{type(prompts).__name__} {prompts!r}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: an empty list")
    if all(isinstance(t, numbers.Number) for t in prompts):  # one prompt given as token ids (ints checked later)
        return [prompts]
    return prompts


def _check_engine_args(*, num_blocks, block_size, gpu_memory_fraction, max_num_seqs, max_num_batched_tokens, seed,
                       cpu_kv_cache_gib, logprobs_mode, max_logprobs) -> None:
    check_int("num_blocks", num_blocks, 1, none=True)
    check_int("block_size", block_size, 1)
    check_float("gpu_memory_fraction", gpu_memory_fraction, 0.0, 1.0, lo_open=True)
    check_int("max_num_seqs", max_num_seqs, 1)
    check_int("max_num_batched_tokens", max_num_batched_tokens, 1)
    check_int("seed", seed)
    check_float("cpu_kv_cache_gib", cpu_kv_cache_gib, 0.0, lo_open=True)
    check_int("max_logprobs", max_logprobs, -1)
    if logprobs_mode not in LOGPROBS_MODES:
        raise ValueError(f"logprobs_mode: must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")


def _max_model_len(value, config, allow_long: bool) -> int:
    """max_model_len, by default the model's max_position_embeddings; longer only by explicit opt-in."""
    trained = int(config.max_position_embeddings)
    if value is None:
        return trained
    check_int("max_model_len", value, 1)
    if value > trained:
        if not (allow_long or os.environ.get("DSMATH_ALLOW_LONG_MAX_MODEL_LEN") == "1"):
            raise ValueError(f"max_model_len: {value} exceeds the model's max_position_embeddings={trained}: "
                             "positions past it were never trained. Pass allow_long_max_model_len=True (or set "
                             "DSMATH_ALLOW_LONG_MAX_MODEL_LEN=1) to run anyway")
        warnings.warn(f"max_model_len={value} exceeds max_position_embeddings={trained}: outputs past position "
                      f"{trained} may be garbage", stacklevel=3)
    return int(value)


GENERATION_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def _generation_config(spec, path: str | None) -> tuple[dict, set[int]]:
    """generation_config="auto" (the checkpoint's generation_config.json, if any), None or "vllm" (ignore it), or
    a directory / .json path -> (SamplingParams defaults, extra EOS ids). Values SamplingParams refuses are
    dropped with a warning."""
    if spec is None or spec in ("vllm", "none"):
        return {}, set()
    if spec == "auto":
        file = os.path.join(path, "generation_config.json") if path else None
        if file is None or not os.path.exists(file):
            return {}, set()
    else:
        file = str(spec) if str(spec).endswith(".json") else os.path.join(str(spec), "generation_config.json")
        if not os.path.exists(file):
            raise FileNotFoundError(f"generation_config: {file} does not exist")
    with open(file) as f:
        cfg = json.load(f)
    defaults = {}
    for key, name in GENERATION_KEYS.items():
        if cfg.get(key) is None:
            continue
        try:
            SamplingParams(**{name: cfg[key]})
            defaults[name] = cfg[key]
        except (TypeError, ValueError) as e:
            warnings.warn(f"generation_config: ignoring {key}={cfg[key]!r} from {file} ({e})", stacklevel=3)
    eos = cfg.get("eos_token_id")
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    return defaults, {int(t) for t in eos if isinstance(t, int)}


def _progress(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        enabled = False
    if not enabled:
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass
        return _Null()
    return tqdm(total=total, desc="generate", unit="req")
