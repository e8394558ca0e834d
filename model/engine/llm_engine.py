"""LLM: the engine users call — `LLM(model).generate(prompts, SamplingParams(...))`, or `.stream(...)`.

One step = schedule (scheduler.py) -> copy-on-write block copies -> forward over the paged cache
(model_runner.py) -> sample (sampler.py) -> append tokens, detokenize, check stops, free finished sequences.
The step's only host sync is the read of the sampled tokens (and their log-probs, in the same transfer).
A request with n samples is prefilled once and forked into n sequences sharing its prompt blocks.
MoE models record, per fed token and MoE layer, the experts it was routed to (beside its K/V, on the device);
`SamplingParams(return_routing=True)` returns them as `CompletionOutput.routing` (routing replay for RL).

`model` is a checkpoint directory (loaded with MoEForCausalLM.from_pretrained, tokenizer with AutoTokenizer
when the directory has one) or a model object used in place — e.g. the GRPO trainer's live MoEForCausalLM,
no copy. Anything with the engine contract (notes/MODEL_ENGINE_CONTRACT.md) works, e.g. mock_model.py.
`tensor_parallel_size=N` (with `enable_expert_parallel=True` for the experts) runs SPMD under
`torchrun --nproc-per-node N`: every rank builds the same LLM and calls the same methods with the same inputs, loads
only its slices of the checkpoint (model/parallel.py) and returns the same outputs (rank 0's sampled tokens are
broadcast each step). `enable_dp_attention=True` (SGLang's name) makes attention data-parallel instead of
heads-split: each rank serves its share of the prompts with its own KV cache (generate only).
"""

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .block_manager import BlockManager
from .detokenizer import decode_step, final_text, find_stop
from .model_runner import ModelRunner
from .outputs import CompletionOutput, RequestOutput, StreamEvent
from .sampler import Sampler, to_device
from .sampling_params import SamplingParams
from .scheduler import Batch, Scheduler
from .sequence import Sequence

log = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class Request:
    request_id: int
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    samples: dict[int, Sequence] = field(default_factory=dict)
    num_finished: int = 0


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
                 tensor_parallel_size: int = 1, enable_expert_parallel: bool = False,
                 enable_dp_attention: bool = False):
        """record_routing: keep each cached token's experts per MoE layer (needed by return_routing; None = on for
        models with MoE layers; costs L * top_k int16 per cache slot and one small write per MoE layer per step).
        tensor_parallel_size / enable_expert_parallel / enable_dp_attention: module docstring (model/parallel.py)."""
        self.parallel = None  # tensor / expert parallel (model/parallel.py): SPMD under torchrun
        if tensor_parallel_size > 1:
            model, device = _parallel_model(model, dtype, device, tensor_parallel_size, enable_expert_parallel,
                                            enable_dp_attention)
            self.parallel = model.parallel
            if enable_dp_attention and not enforce_eager and torch.device(device).type == "cuda":
                log.warning("enable_dp_attention: decode runs without CUDA graphs (the ranks' batch sizes differ "
                            "from step to step; padding every rank to the largest is not implemented)")
                enforce_eager = True
        self.model, path = _load_model(model, dtype, device)
        moe_layers = int(getattr(self.model, "num_moe_layers", 0) or 0)
        if record_routing and not moe_layers:
            raise ValueError("record_routing: the model has no MoE layers (no num_moe_layers) to record")
        self.record_routing = bool(moe_layers) if record_routing is None else bool(record_routing)
        self.tokenizer = _load_tokenizer(tokenizer, path)
        self.device = torch.device(self.model.device)
        cfg = self.model.config
        self.max_model_len = int(max_model_len or cfg.max_position_embeddings)
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
                                  enforce_eager=enforce_eager, record_routing=self.record_routing)
        self.sampler = Sampler(seed)
        self.eos_ids = _eos_ids(cfg, self.tokenizer)
        self.requests: dict[int, Request] = {}
        self.finished: dict[int, RequestOutput] = {}
        self.stats = EngineStats(step_log=[] if record_steps else None)
        self._next_id = 0
        self._stream_text = False

    # ---- requests ------------------------------------------------------------------------------------------------
    def _encode(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompts: a string prompt needs a tokenizer; pass token ids or tokenizer=")
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        ids = [int(t) for t in prompt]
        return None, ids

    def _make_request(self, prompt, params: SamplingParams | None) -> Request:
        params = params or SamplingParams()
        text, ids = self._encode(prompt)
        V, bm = self.model.config.vocab_size, self.block_manager
        if not ids:
            raise ValueError("prompts: an empty prompt")
        if min(ids) < 0 or max(ids) >= V:
            raise ValueError(f"prompts: token ids must lie in [0, {V}), got {min(ids)}..{max(ids)}")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompts: {len(ids)} tokens leave no room under max_model_len={self.max_model_len}")
        need = bm.blocks_for(min(len(ids) + params.max_tokens, self.max_model_len))
        if need > bm.num_blocks:
            raise ValueError(f"prompts: a {len(ids)}-token prompt + {params.max_tokens} new tokens needs {need} "
                             f"KV blocks, the cache has {bm.num_blocks}")
        if params.n > self.max_num_seqs:
            raise ValueError(f"params.n: {params.n} samples exceed max_num_seqs={self.max_num_seqs}")
        if params.stop_list and self.tokenizer is None:
            raise ValueError("params.stop: stop strings need a tokenizer (use stop_token_ids)")
        if params.return_routing and self.runner.routing is None:
            raise ValueError("params.return_routing: this engine records no routing (a model without MoE layers, "
                             "or LLM(record_routing=False))")
        rid, self._next_id = self._next_id, self._next_id + 1
        return Request(rid, text, ids, params)

    def _enqueue(self, req: Request) -> int:
        seq = Sequence(req.request_id, req.prompt_ids, req.params, 0)
        seq.make_generator()
        req.samples[0] = seq
        self.requests[req.request_id] = req
        self.scheduler.add(seq)
        return req.request_id

    def add_request(self, prompt, params: SamplingParams | None = None) -> int:
        """Queue one prompt (string or token ids); returns its request id. Run `step()` to make progress."""
        return self._enqueue(self._make_request(prompt, params))

    def abort(self, request_id: int) -> None:
        """Drop a request (all its samples) and free its blocks; unknown or finished ids are ignored."""
        req = self.requests.pop(request_id, None)
        for seq in req.samples.values() if req else ():
            if not seq.is_finished:
                self.scheduler.abort(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def reset_prefix_cache(self) -> None:
        """Drop cached prompt blocks; call after changing the model's weights (e.g. a GRPO optimizer step)
        when enable_prefix_caching=True, between generate calls."""
        if self.has_unfinished():
            raise RuntimeError("reset_prefix_cache: requests are still running")
        self.block_manager.reset_prefix_cache()

    # ---- one engine step -----------------------------------------------------------------------------------------
    def step(self) -> list[StreamEvent]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self.has_unfinished():
                raise RuntimeError("scheduler: no sequence could be scheduled (KV cache too small?)")
            return []
        self.runner.copy_blocks(batch.copies)
        logits = self.runner.run(batch)                                   # [B, V]
        self._record(batch)
        rows, seqs = self._advance(batch)
        if not seqs:
            return []
        rows_t = to_device(rows, torch.int64, logits.device)
        tokens, logprobs = self.sampler(logits[rows_t], [s.params for s in seqs], [s.generator for s in seqs])
        values = torch.stack((tokens.double(), logprobs.double()))
        if self.parallel is not None and not self.parallel.dp_attention:  # SPMD: every rank appends rank 0's tokens
            torch.distributed.broadcast(values, src=0, group=self.parallel.group)
        values = values.tolist()  # the step's one host sync
        return [self._append(s, int(t), lp) for s, t, lp in zip(seqs, *values)]

    def _advance(self, batch: Batch) -> tuple[list[int], list[Sequence]]:
        """Mark the fed tokens computed; fork finished n-sample prefills; pick the rows to sample from."""
        rows, seqs = [], []
        for row, (seq, k) in enumerate(zip(batch.seqs, batch.num_new)):
            seq.num_computed += k
            self.block_manager.seal(seq)
            if seq.num_computed < len(seq):        # a prefill chunk that is not the last one
                continue
            group = [seq] + (self._fork(seq) if seq.n_fork > 1 else [])
            rows += [row] * len(group)
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

    def _append(self, seq: Sequence, token: int, logprob: float) -> StreamEvent:
        p = seq.params
        seq.append(token, logprob if p.logprobs else None)
        piece = ""
        if self.tokenizer is not None and (p.stop_list or self._stream_text):
            piece = decode_step(self.tokenizer, seq)
        reason = self._finish_reason(seq, token, piece)
        text = self._emit_text(seq, reason is not None) if self.tokenizer is not None else None
        if reason is not None:
            seq.finish_reason = reason
            if p.return_routing:  # before its blocks (and their recorded experts) are freed
                seq.routing = self.runner.gather_routing(seq)
            self.scheduler.finish(seq)
            self._finish_sample(seq)
        return StreamEvent(seq.request_id, seq.index, token, logprob if p.logprobs else None, text, reason)

    @staticmethod
    def _emit_text(seq: Sequence, final: bool) -> str:
        """Streamed text: hold back the last (longest stop - 1) characters, which a stop string may still cut."""
        hold = 0 if final or not seq.params.stop_list else max(map(len, seq.params.stop_list)) - 1
        end = max(seq.num_emitted, len(seq.text) - hold)
        out, seq.num_emitted = seq.text[seq.num_emitted:end], end
        return out

    def _finish_reason(self, seq: Sequence, token: int, piece: str) -> str | None:
        p = seq.params
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if p.stop_list and piece:
            i = find_stop(seq.text, piece, p.stop_list)
            if i >= 0:
                seq.text = seq.text[:i]
                seq.stopped_by_string = True
                return "stop"
        if seq.num_completion_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None

    def _finish_sample(self, seq: Sequence) -> None:
        req = self.requests[seq.request_id]
        req.num_finished += 1
        if req.num_finished < req.params.n:
            return
        del self.requests[req.request_id]
        outs = [CompletionOutput(s.index, s.completion_ids,
                                 final_text(self.tokenizer, s, req.params.stop_list),
                                 list(s.logprobs) if req.params.logprobs else None, s.finish_reason,
                                 s.num_preemptions, s.routing)
                for s in sorted(req.samples.values(), key=lambda s: s.index)]
        self.finished[req.request_id] = RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs)

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
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (strings or token-id lists); one RequestOutput per prompt, in order."""
        if self.parallel is not None and self.parallel.dp_attention:
            from ..parallel import dp_generate
            return dp_generate(self, prompts, params)
        ids = self._add_all(prompts, params)
        bar = _progress(len(ids), use_tqdm)
        pending = set(ids)
        while pending:
            for ev in self.step():
                if ev.finish_reason is not None and ev.request_id in self.finished and ev.request_id in pending:
                    pending.discard(ev.request_id)
                    bar.update(1)
        bar.close()
        return [self.finished.pop(i) for i in ids]

    def stream(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> Iterator[StreamEvent]:
        """Yield a StreamEvent for every new token of every sample, as the steps produce them. With a tokenizer
        each event carries the text it completed (stop strings cut)."""
        if self.parallel is not None and self.parallel.dp_attention:
            raise NotImplementedError("stream: not available with enable_dp_attention (use generate)")
        ids = set(self._add_all(prompts, params))
        self._stream_text = True
        try:
            while any(i in self.requests for i in ids):
                yield from (ev for ev in self.step() if ev.request_id in ids)
        finally:  # also when the caller stops iterating early: its unfinished requests are aborted
            self._stream_text = False
            for i in ids:
                self.abort(i)
                self.finished.pop(i, None)

    def _add_all(self, prompts, params) -> list[int]:
        prompts = _as_prompt_list(prompts)
        plist = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"params: {len(plist)} SamplingParams for {len(prompts)} prompts")
        reqs = [self._make_request(p, sp) for p, sp in zip(prompts, plist)]  # validate all before queueing any
        return [self._enqueue(r) for r in reqs]

    # ---- sizing ---------------------------------------------------------------------------------------------------
    def _auto_num_blocks(self, block_size: int, fraction: float, max_tokens: int, max_seqs: int,
                         cpu_gib: float) -> int:
        extra = {"routing": True} if self.record_routing else {}
        per_block = self.model.kv_cache_bytes_per_block(block_size, **extra)
        if self.device.type != "cuda":
            return max(1, int(cpu_gib * 2**30) // per_block)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"gpu_memory_fraction: must be in (0, 1], got {fraction}")
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        peak = _profile_forward(self.model, min(max_tokens, self.max_model_len - 1), block_size) - base
        reserve = 8 * max_seqs * self.model.config.vocab_size * 4       # logits + sampler temporaries
        total = torch.cuda.get_device_properties(self.device).total_memory
        n = int((total * fraction - base - peak - reserve) // per_block)
        if n < 1:
            raise RuntimeError(f"gpu_memory_fraction={fraction}: no memory left for the KV cache "
                               f"(weights {base / 2**30:.1f} GiB, activations {peak / 2**30:.1f} GiB)")
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
    if isinstance(prompts, (str, torch.Tensor)) and not (isinstance(prompts, torch.Tensor) and prompts.ndim == 2):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):  # one prompt given as token ids
        return [prompts]
    return prompts


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
