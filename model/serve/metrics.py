"""GET /metrics: the engine's serving statistics in the Prometheus text format (no client library needed).

Gauges: requests running / waiting, KV-cache use. Counters: prompt and generated tokens, finished requests by
finish reason, aborted requests. Histograms: time to first token, time per output token (a request's mean gap
between tokens after the first), end-to-end latency."""

from __future__ import annotations

from ..engine import AsyncLLM
from ..engine.async_llm import Histogram


def _line(name: str, labels: dict, value) -> str:
    body = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{name}{{{body}}} {value}"


def _histogram(name: str, help_: str, h: Histogram, labels: dict) -> list[str]:
    out = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
    out += [_line(f"{name}_bucket", {**labels, "le": b}, c) for b, c in zip(h.buckets, h.counts)]
    out += [_line(f"{name}_bucket", {**labels, "le": "+Inf"}, h.count),
            _line(f"{name}_sum", labels, h.sum), _line(f"{name}_count", labels, h.count)]
    return out


def render(engine: AsyncLLM, model_name: str) -> str:
    st, bm, lb = engine.stats, engine.llm.block_manager, {"model_name": model_name}
    in_flight = engine.num_in_flight
    running = min(st.num_running, in_flight)
    out = []
    for name, kind, help_, value in [
        ("dsmath_num_requests_running", "gauge", "Requests with sequences scheduled on the engine.", running),
        ("dsmath_num_requests_waiting", "gauge", "Requests accepted and not yet scheduled.", in_flight - running),
        ("dsmath_kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (1 = full).",
         1.0 - bm.num_free / bm.num_blocks),
        ("dsmath_kv_cache_blocks_used", "gauge", "KV-cache blocks in use.", bm.num_blocks - bm.num_free),
        ("dsmath_kv_cache_blocks_total", "gauge", "KV-cache blocks.", bm.num_blocks),
        ("dsmath_prompt_tokens_total", "counter", "Prompt tokens of requests that started.", st.prompt_tokens),
        ("dsmath_generation_tokens_total", "counter", "Generated tokens.", st.generation_tokens),
        ("dsmath_requests_aborted_total", "counter", "Requests aborted (client gone, shutdown).", st.aborted),
    ]:
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", _line(name, lb, value)]
    name = "dsmath_request_success_total"
    out += [f"# HELP {name} Finished samples by finish reason.", f"# TYPE {name} counter"]
    out += [_line(name, {**lb, "finished_reason": r}, n) for r, n in sorted(st.finished.items())]
    out += _histogram("dsmath_time_to_first_token_seconds", "Arrival to first token.", st.ttft, lb)
    out += _histogram("dsmath_time_per_output_token_seconds", "Mean time per output token after the first.",
                      st.tpot, lb)
    out += _histogram("dsmath_e2e_request_latency_seconds", "Arrival to finish.", st.e2e, lb)
    return "\n".join(out) + "\n"
