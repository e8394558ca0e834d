"""ModelRunner: turns a scheduled Batch into a ForwardMeta, runs `model.forward_paged`, owns the KV cache.

Metadata is built on the host with vectorised torch ops (no per-token Python loops) and copied to the device
in one non-blocking transfer per tensor. Pure decode steps on CUDA replay a CUDA graph captured for the
smallest captured batch size >= B and the smallest context bucket >= the batch's longest sequence (padding rows
write nowhere: slot -1, and attend to one token of block 0); everything else runs eagerly. Each bucket has its own
split plan (plan_decode with the model's head counts), so small batches of short sequences still get split
parallelism. Capture is attempted at start-up (and again when LLM.wake_up re-allocates the cache) and falls back to
eager mode, with a warning and `capture_error`, if the model cannot be captured (e.g. an op that syncs with the
host). `release()` / `allocate()` free and re-create the cache and graphs (LLM.sleep / wake_up).
With record_routing (MoE models) the cache also holds each cached token's experts per MoE layer, written by the
forward itself (eager and graphed alike), copied on copy-on-write, read per sequence by `gather_routing`.

Shared-prefix (cascade) decode: on decode steps the runner finds rows whose block tables share leading full blocks
(the n samples of a prompt share its blocks through the ref-counted block manager) with host integers only, and
passes them as meta.cascade; attention then reads each shared prompt once per group, not once per sample. Graphs
are captured with and without a cascade; the cascade's tensors are static buffers padded to the graph's size.
"""

import dataclasses
import logging

import torch

from ..meta import ForwardMeta
from .sampler import to_device
from .scheduler import Batch

log = logging.getLogger(__name__)
# Optional ForwardMeta field: the longest query run of a prefill step, so paged_prefill needs no host sync.
HAS_MAX_Q = "max_seqlen_q" in {f.name for f in dataclasses.fields(ForwardMeta)}

HAS_CASCADE = "cascade" in {f.name for f in dataclasses.fields(ForwardMeta)}
CTX_BUCKETS = (4096, 16384, 65536)  # graph plans per context-length bucket, and one for max_model_len

try:  # split plan for decode attention, computed once per step from host integers (graph safe)
    from dsmath_kernels import plan_decode
except ImportError:  # pragma: no cover - kernels package without attention
    plan_decode = None
try:  # shared-prefix groups of a decode batch, from host block tables (no sync)
    from dsmath_kernels import SharedPrefix, shared_prefix
    from dsmath_kernels.cascade import max_tiles
    from dsmath_kernels.mla_decode_triton import tile_shape
except ImportError:  # pragma: no cover - kernels package without cascade decode
    shared_prefix = None


def _kv_heads(config) -> int:
    return 1 if getattr(config, "is_mla", False) else int(getattr(config, "num_key_value_heads", 1) or 1)


def _capture_mode() -> str:
    """Under torch.distributed (a trainer's rollout), capture in thread-local mode: the NCCL watchdog thread may
    query events of earlier collectives while this thread captures, which the default global mode turns into a
    failed capture. Our own thread's unsafe calls still fail the capture."""
    import torch.distributed as dist

    return "thread_local" if dist.is_available() and dist.is_initialized() else "global"


def logits_starts(batch: Batch) -> list[int]:
    """Row of each sequence's first logit in what `ModelRunner.run` returns: one row per sequence (its last new
    token), or one per new token for sequences with batch.all_logits set. A sequence's last row is
    starts[b + 1] - 1 (a final entry closes the list)."""
    counts = [k if (batch.all_logits and batch.all_logits[b]) else 1 for b, k in enumerate(batch.num_new)]
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    return starts


def logits_indices(batch: Batch, cu: torch.Tensor) -> torch.Tensor:
    """[M] int64 indices into the N new tokens whose logits the model returns (see logits_starts)."""
    if not any(batch.all_logits):
        return cu[1:] - 1
    return torch.cat([torch.arange(int(cu[b]), int(cu[b + 1])) if every else cu[b + 1:b + 2] - 1
                      for b, every in enumerate(batch.all_logits)])


class ModelRunner:
    def __init__(self, model, *, num_blocks: int, block_size: int, max_model_len: int, max_num_seqs: int,
                 kv_dtype: torch.dtype | None = None, enforce_eager: bool = False, record_routing: bool = False,
                 cascade: bool = True):
        self.model = model
        self.device = torch.device(model.device)
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.kv_heads = _kv_heads(model.config)
        self.q_heads = int(getattr(model.config, "num_attention_heads", self.kv_heads))
        self.mla = bool(getattr(model.config, "is_mla", False))
        self.cascade = bool(cascade) and shared_prefix is not None and HAS_CASCADE
        self.kernel = "triton" if self.device.type == "cuda" else "cpu"  # whose tiling the cascade tensors follow
        self.buckets = sorted({b for b in CTX_BUCKETS if b < max_model_len} | {max_model_len})
        self.num_blocks, self.kv_dtype, self.max_num_seqs = num_blocks, kv_dtype, max_num_seqs
        self.enforce_eager, self.record_routing = enforce_eager, record_routing
        self.routing = None  # [S + 1, L, K] or None
        self.pin = self.device.type == "cuda"
        self.graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.sizes: list[int] = []
        self.capture_error: str | None = None
        self.kv_cache = None
        self.allocate()

    # ---- sleep mode (LLM.sleep / wake_up) -------------------------------------------------------------------------
    def allocate(self) -> None:
        """Allocate the KV cache (num_blocks, fixed at start) and capture the decode CUDA graphs on it."""
        extra = {"routing": True} if self.record_routing else {}  # models without MoE layers take no such argument
        self.kv_cache = self.model.allocate_kv_cache(self.num_blocks, self.block_size, dtype=self.kv_dtype,
                                                     device=self.device, **extra)
        self.routing = getattr(self.kv_cache, "routing", None)
        if self.device.type == "cuda" and not self.enforce_eager:
            self.capture(self.max_num_seqs)

    def release(self) -> None:
        """Free the KV cache, the CUDA graphs (their memory pool) and the static buffers they read."""
        self.graphs.clear()
        self.kv_cache = self.static = self.routing = None
        self.static_cascade = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    # ---- metadata ---------------------------------------------------------------------------------------------
    def _plan(self, B: int, max_len: int):
        if plan_decode is None:
            return None
        return plan_decode(B, max_len, num_kv_heads=self.kv_heads, num_q_heads=self.q_heads, device=self.device,
                           tiled=self.mla)

    def _cascade(self, batch: Batch, tables: torch.Tensor, lens: torch.Tensor, *, pad_to: int | None = None,
                 device=None):
        """Shared-prefix groups of a decode batch from its host tables (no device sync), or None."""
        if not (self.cascade and batch.is_decode and len(batch.seqs) > 1):
            return None
        return shared_prefix(tables, lens, self.block_size, num_q_heads=self.q_heads, num_kv_heads=self.kv_heads,
                             device=device or self.device, pad_to=pad_to, kernel=self.kernel)

    def host_meta(self, batch: Batch) -> dict:
        """Host (CPU) tensors of the step's metadata."""
        bs, seqs = self.block_size, batch.seqs
        starts = [s.num_computed for s in seqs]
        lens = [a + k for a, k in zip(starts, batch.num_new)]
        width = max(1, -(-max(lens) // bs))
        tables = torch.tensor([s.block_table[:width] + [0] * (width - min(width, len(s.block_table)))
                               for s in seqs], dtype=torch.int32)                  # [B, W]
        if batch.is_decode:  # one token per sequence: plain Python is cheaper than tensor ops
            ids = [s.token_ids[a] for s, a in zip(seqs, starts)]
            slots = [s.block_table[a // bs] * bs + a % bs for s, a in zip(seqs, starts)]
            pos, cu = torch.tensor(starts), torch.arange(len(seqs) + 1)
            slots = torch.tensor(slots)
        else:
            n = torch.tensor(batch.num_new)                                         # [B]
            cu = torch.zeros(len(seqs) + 1, dtype=torch.int64)
            cu[1:] = n.cumsum(0)
            row = torch.repeat_interleave(torch.arange(len(seqs)), n)               # [N] sequence of each token
            pos = torch.arange(int(cu[-1])) - cu[row] + torch.tensor(starts)[row]   # [N]
            ids = [t for s, a, k in zip(seqs, starts, batch.num_new) for t in s.token_ids[a:a + k]]
            slots = tables[row, pos // bs].long() * bs + pos % bs                  # [N]
        return {"input_ids": torch.tensor(ids, dtype=torch.int64), "positions": pos, "cu_seqlens_q": cu.int(),
                "seq_lens": torch.tensor(lens, dtype=torch.int32), "block_tables": tables, "slot_mapping": slots,
                "logits_indices": logits_indices(batch, cu)}

    def prepare(self, batch: Batch) -> ForwardMeta:
        h = self.host_meta(batch)
        dev = {k: (v.pin_memory() if self.pin else v).to(self.device, non_blocking=True) for k, v in h.items()}
        plan = self._plan(len(batch.seqs), int(h["seq_lens"].max())) if batch.is_decode else None
        extra = {"max_seqlen_q": max(batch.num_new)} if HAS_MAX_Q else {}
        if HAS_CASCADE:
            extra["cascade"] = self._cascade(batch, h["block_tables"], h["seq_lens"])
        return ForwardMeta(**dev, is_decode=batch.is_decode, decode_plan=plan, **extra)

    # ---- running ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: Batch) -> torch.Tensor:
        """Logits [M, V] float32: of each scheduled sequence's last new token (M = B), and of every new token of
        the sequences with batch.all_logits set (rows laid out by logits_starts)."""
        B = len(batch.seqs)
        if batch.is_decode and self.graphs and B <= self.sizes[-1]:
            return self._replay(batch)
        return self.model.forward_paged(self.prepare(batch), self.kv_cache)

    @torch.inference_mode()
    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: cache block src -> dst in every layer."""
        if not copies:
            return
        src = to_device([s for s, _ in copies], torch.int64, self.device)
        dst = to_device([d for _, d in copies], torch.int64, self.device)
        for i in range(len(self.kv_cache)):
            layer = self.kv_cache[i]
            for t in layer if isinstance(layer, (tuple, list)) else (layer,):
                t = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t  # fp8 cache: copy the bytes
                t.index_copy_(0, dst, t.index_select(0, src))
        if self.routing is not None:  # the blocks' recorded experts travel with their K/V
            r = self.routing[:-1].view(-1, self.block_size, *self.routing.shape[1:])  # [NB, BS, L, K]
            r.index_copy_(0, dst, r.index_select(0, src))

    def gather_routing(self, seq) -> torch.Tensor:
        """[n, L, K] experts of the sequence's first n = num_computed tokens (those fed through the model), a copy
        on the device (no host sync); read before the sequence's blocks are freed."""
        bs, n = self.block_size, seq.num_computed
        table = torch.tensor(seq.block_table[: -(-n // bs)], dtype=torch.int64)
        pos = torch.arange(n)
        slots = table[pos // bs] * bs + pos % bs                                    # [n]
        return self.routing.index_select(0, slots.pin_memory().to(self.device, non_blocking=True)
                                         if self.pin else slots)

    # ---- CUDA graphs -------------------------------------------------------------------------------------------
    @staticmethod
    def graph_sizes(max_num_seqs: int) -> list[int]:
        sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs + 1, 16))
        return sorted(set(sizes + [max_num_seqs]))

    def alloc_static(self, M: int) -> None:
        """Static input buffers the graphs read (for up to M sequences); padding rows write nowhere."""
        dev = self.device
        self.static = {
            "input_ids": torch.zeros(M, dtype=torch.int64, device=dev),
            "positions": torch.zeros(M, dtype=torch.int64, device=dev),
            "cu_seqlens_q": torch.arange(M + 1, dtype=torch.int32, device=dev),
            "seq_lens": torch.ones(M, dtype=torch.int32, device=dev),
            "block_tables": torch.zeros(M, self.max_blocks, dtype=torch.int32, device=dev),
            "slot_mapping": torch.full((M,), -1, dtype=torch.int64, device=dev),
            "logits_indices": torch.arange(M, dtype=torch.int64, device=dev)}
        if self.cascade:  # shared-prefix metadata, padded (empty tiles) to the graph's batch size
            self.static_cascade = {
                "prefix_lens": torch.zeros(M, dtype=torch.int32, device=dev),
                "members": torch.zeros(M, dtype=torch.int32, device=dev),
                "tiles": torch.zeros(self._max_tiles(M), 5, dtype=torch.int32, device=dev)}

    def _max_tiles(self, bs: int) -> int:
        return max_tiles(bs, self.q_heads, self.kv_heads, self.kernel)

    def static_meta(self, bs: int, bucket: int, cascade: bool = False) -> ForwardMeta:
        """Decode metadata of the first bs static rows, with the split plan of the context bucket (fixed in the
        graph) and, for cascade graphs, the static shared-prefix buffers."""
        extra = {}
        if cascade:
            st = self.static_cascade
            ht = tile_shape(self.q_heads, self.kv_heads, self.kernel)[0]
            extra["cascade"] = SharedPrefix(st["prefix_lens"][:bs], st["members"][:bs],
                                            st["tiles"][: self._max_tiles(bs)], ht, 0, 0)
        return ForwardMeta(**{k: v[: bs + 1] if k == "cu_seqlens_q" else v[:bs] for k, v in self.static.items()},
                           is_decode=True, decode_plan=self._plan(bs, bucket), **extra)

    def graph_keys(self, max_num_seqs: int) -> dict[tuple[int, int, bool], tuple[int, int, bool]]:
        """(batch size, context bucket, cascade) -> the key of the graph that serves it: buckets whose split plans
        coincide share one graph (e.g. every bucket once a batch needs no splits)."""
        keys = {}
        for bs in self.graph_sizes(max_num_seqs):
            for cascade in (False, True) if self.cascade and bs > 1 else (False,):
                seen = {}
                for bucket in self.buckets:
                    p = self._plan(bs, bucket)
                    if p is None:
                        tag = None
                    else:  # the tiled kernels use only num_splits; with one split the chunk does not matter
                        tag = p.num_splits if (self.mla or p.num_splits == 1) else (p.num_splits, p.chunk)
                    keys[(bs, bucket, cascade)] = seen.setdefault(tag, (bs, bucket, cascade))
        return keys

    def capture(self, max_num_seqs: int) -> None:
        self.sizes = self.graph_sizes(max_num_seqs)
        self.alloc_static(self.sizes[-1])
        keys = self.graph_keys(max_num_seqs)
        try:
            pool, done = None, {}
            for key in sorted(set(keys.values()), reverse=True):  # largest first: smaller graphs reuse its pool
                meta = self.static_meta(*key)
                with torch.inference_mode():
                    self.model.forward_paged(meta, self.kv_cache)  # warm-up (lazy inits, autotuning)
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, capture_error_mode=_capture_mode()):
                        out = self.model.forward_paged(meta, self.kv_cache)
                pool = graph.pool() if pool is None else pool
                done[key] = (graph, out)
            self.graphs = {k: done[v] for k, v in keys.items()}
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - any capture failure means: run decode eagerly
            log.warning("CUDA graph capture failed (%s: %s); decode runs eagerly", type(e).__name__, e)
            self.graphs.clear()
            self.capture_error = f"{type(e).__name__}: {e}"
            torch.cuda.synchronize()  # a failed capture is not a sticky error: the device stays usable

    def _replay(self, batch: Batch) -> torch.Tensor:
        B = len(batch.seqs)
        bs = min(b for b in self.sizes if b >= B)
        h, st = {k: v.pin_memory() if self.pin else v for k, v in self.host_meta(batch).items()}, self.static
        bucket = min(b for b in self.buckets if b >= int(h["seq_lens"].max()))
        cascade = self._cascade(batch, h["block_tables"], h["seq_lens"], pad_to=bs, device="cpu")
        if cascade is not None:
            sc = self.static_cascade
            for k in ("prefix_lens", "members", "tiles"):
                t = getattr(cascade, k)
                sc[k][: t.shape[0]].copy_(t.pin_memory() if self.pin else t, non_blocking=True)
        for k in ("input_ids", "positions", "seq_lens", "slot_mapping"):
            st[k][:B].copy_(h[k], non_blocking=True)
        st["block_tables"][:B, : h["block_tables"].shape[1]].copy_(h["block_tables"], non_blocking=True)
        st["slot_mapping"][B:bs].fill_(-1)   # padding rows: write nowhere, read 1 token of block 0
        st["seq_lens"][B:bs].fill_(1)
        st["block_tables"][B:bs, 0].fill_(0)
        graph, out = self.graphs[(bs, bucket, cascade is not None)]
        graph.replay()
        return out[:B]
