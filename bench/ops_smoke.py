"""First step of bench/device_check.sh (<= 60 s): every public op once on the GPU, in strict mode (DSMATH_STRICT=1:
a fallback raises), at two shapes each, against its PyTorch reference. One line per op and shape:

    ok          the device's kernel ran (launch count) and matches the reference
    wrong       it ran and does not match (worst error printed)
    fell back   it could not take its kernel (FallbackError: the reason)
    crashed     it raised anything else (the exception; a CUDA error may take the later ops with it)

then a JSON summary line. `python bench/ops_smoke.py [--device cpu]` (the CPU run checks the script itself)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

os.environ["DSMATH_STRICT"] = "1"

import torch  # noqa: E402

import dsmath_kernels as dk  # noqa: E402
from dsmath_kernels import _dispatch  # noqa: E402
from dsmath_kernels import reference as ref  # noqa: E402
from dsmath_kernels.reference.attention import paginate, paginate_like  # noqa: E402


def _err(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    return float(((a - b).abs() / (b.abs() + 1)).max())


def _cases(dev):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rn(*s, dt=torch.float32, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dev, dt)

    bf, f32, f16 = torch.bfloat16, torch.float32, torch.float16
    i32 = torch.int32
    cases = []

    # routing: DeepSeek-V3 (sigmoid, bias, 8 groups keep 4) and V2-Lite (softmax top-6)
    for T, E, K, kw in ((4096, 256, 8, dict(scoring="sigmoid", n_group=8, topk_group=4, routed_scaling_factor=2.5)),
                        (7, 64, 6, dict(renormalize=False))):
        x = rn(T, E, dt=bf)
        if kw.get("scoring") == "sigmoid":
            kw = dict(kw, bias=rn(E, scale=0.1))

        def run(x=x, K=K, kw=kw):
            w, i = dk.route_topk(x, K, **kw)
            w_ref, i_ref = ref.route_topk_ref(x, K, **kw)
            return max(_err(w, w_ref), float((i != i_ref).float().mean()))
        cases.append(("route_topk", f"T{T} E{E} K{K}", run, 1e-5))

    for T, K, E, bm in ((4096, 8, 256, 1), (5, 6, 64, 16)):
        ids = torch.randint(0, E, (T, K), generator=g).to(dev, i32)

        def run(ids=ids, E=E, bm=bm):
            p = dk.moe_permute(ids, E, block_m=bm)
            o, off, inv = ref.moe_permute_ref(ids, E, bm)
            return max(_err(p.order, o), _err(p.expert_offsets, off), _err(p.inverse, inv))
        cases.append(("moe_permute", f"T{T} K{K} E{E} block_m{bm}", run, 0.0))

    for M, Kd, N, E, dt in ((2048, 1024, 1408, 16, bf), (70, 64, 96, 4, f32)):
        cuts = torch.sort(torch.randint(0, M + 1, (E - 1,), generator=g)).values
        off = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.full((1,), M)]).to(dev, i32)
        x, w = rn(M, Kd, dt=dt), rn(E, N, Kd, dt=dt, scale=Kd**-0.5)
        cases.append(("grouped_gemm", f"M{M} K{Kd} N{N} E{E} {str(dt)[6:]}",
                      lambda x=x, w=w, off=off: _err(dk.grouped_gemm(x, w, off), ref.grouped_gemm_ref(x, w, off)),
                      2e-2 if dt == bf else 1e-4))

    for T, H, I, E, K, dt, train in ((256, 512, 256, 16, 4, bf, False), (96, 128, 64, 8, 2, f32, True)):  # noqa: E741
        x, wgu, wdn = rn(T, H, dt=dt), rn(E, 2 * I, H, dt=dt, scale=H**-0.5), rn(E, H, I, dt=dt, scale=I**-0.5)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(dev, i32)
        w = torch.softmax(rn(T, K), -1)

        def run(x=x, wgu=wgu, wdn=wdn, w=w, ids=ids, train=train):
            if not train:
                with torch.no_grad():
                    return _err(dk.moe_experts(x, wgu, wdn, w, ids), ref.moe_experts_ref(x, wgu, wdn, w, ids))
            a = [t.detach().requires_grad_(True) for t in (x, wgu, wdn, w)]
            b = [t.detach().requires_grad_(True) for t in (x, wgu, wdn, w)]
            out, out_ref = dk.moe_experts(*a, ids), ref.moe_experts_ref(*b, ids)
            dy = torch.randn_like(out)
            ga, gb = torch.autograd.grad(out, a, dy), torch.autograd.grad(out_ref, b, dy)
            return max([_err(out, out_ref)] + [_err(p, q) for p, q in zip(ga, gb)])
        cases.append(("moe_experts", f"T{T} H{H} I{I} E{E} K{K} {str(dt)[6:]}{' fwd+bwd' if train else ''}", run,
                      3e-2 if dt == bf else 1e-4))

    for bs, dt in ((64, bf), (16, f32)):
        NB, Hkv, D, N = 16, 4, 128, 40
        k, v, slots = rn(N, Hkv, D, dt=dt), rn(N, Hkv, D, dt=dt), torch.randperm(NB * bs, generator=g)[:N]
        slots[3] = -1
        slots = slots.to(dev)

        def run(k=k, v=v, slots=slots, bs=bs, dt=dt, NB=NB):
            kc = torch.zeros(NB, bs, 4, 128, dtype=dt, device=dev)
            vc = torch.zeros_like(kc)
            kr, vr = kc.clone(), vc.clone()
            dk.cache_write(k, v, kc, vc, slots)
            ref.cache_write_ref(k, v, kr, vr, slots)
            return max(_err(kc, kr), _err(vc, vr))
        cases.append(("cache_write", f"N{N} block {bs} {str(dt)[6:]}", run, 0.0))

        def run_mla(bs=bs, dt=dt, slots=slots, N=N, NB=NB):
            kv = rn(N, 576, dt=dt)
            c, r = torch.zeros(NB, bs, 576, dtype=dt, device=dev), torch.zeros(NB, bs, 576, dtype=dt, device=dev)
            dk.mla_cache_write(kv, c, slots)
            ref.mla_cache_write_ref(kv, r, slots)
            return _err(c, r)
        cases.append(("mla_cache_write", f"N{N} block {bs} {str(dt)[6:]}", run_mla, 0.0))

    for lens, Hq, Hkv, D, bs, dt in (([1500, 0, 33, 700, 1, 64, 2047, 300], 32, 8, 128, 64, bf),
                                     ([40, 9], 8, 8, 64, 16, f16)):
        ks = [rn(L, Hkv, D, dt=dt) for L in lens]
        vs = [rn(L, Hkv, D, dt=dt) for L in lens]
        kc, bt = paginate(ks, bs, generator=g)
        vc = paginate_like(vs, bt, kc.shape[0], bs)
        kc, vc, bt = kc.to(dev), vc.to(dev), bt.to(dev)
        sl = torch.tensor(lens, dtype=i32, device=dev)
        q = rn(len(lens), Hq, D, dt=dt)
        cases.append(("paged_decode", f"B{len(lens)} Hq{Hq} Hkv{Hkv} D{D} {str(dt)[6:]}",
                      lambda q=q, kc=kc, vc=vc, bt=bt, sl=sl: _err(dk.paged_decode(q, kc, vc, bt, sl, 0.1),
                                                                   ref.paged_decode_ref(q, kc, vc, bt, sl, 0.1)),
                      2e-2))
        nq = [min(L, 37) for L in lens]
        cu = torch.tensor([0] + list(torch.tensor(nq).cumsum(0)), dtype=i32, device=dev)
        qp = rn(sum(nq), Hq, D, dt=dt)
        cases.append(("paged_prefill", f"B{len(lens)} Hq{Hq} Hkv{Hkv} D{D} {str(dt)[6:]}",
                      lambda qp=qp, kc=kc, vc=vc, bt=bt, cu=cu, sl=sl: _err(
                          dk.paged_prefill(qp, kc, vc, bt, cu, sl, 0.1),
                          ref.paged_prefill_ref(qp, kc, vc, bt, cu, sl, 0.1)), 2e-2))

    for lens, H, bs, dt in (([900, 0, 65, 2000], 16, 64, bf), ([33, 7], 128, 16, f32)):
        kv, bt = paginate([rn(L, 576, dt=dt) for L in lens], bs, generator=g)
        kv, bt = kv.to(dev), bt.to(dev)
        sl = torch.tensor(lens, dtype=i32, device=dev)
        q = rn(len(lens), H, 576, dt=dt, scale=0.1)
        cases.append(("mla_decode", f"B{len(lens)} H{H} 576/512 {str(dt)[6:]}",
                      lambda q=q, kv=kv, bt=bt, sl=sl: _err(dk.mla_decode(q, kv, bt, sl, 0.05),
                                                            ref.mla_decode_ref(q, kv, bt, sl, 0.05)),
                      2e-2 if dt == bf else 1e-4))
        nq = [min(L, 20) for L in lens]
        cu = torch.tensor([0] + list(torch.tensor(nq).cumsum(0)), dtype=i32, device=dev)
        qp = rn(sum(nq), H, 576, dt=dt, scale=0.1)
        cases.append(("mla_prefill", f"B{len(lens)} H{H} 576/512 {str(dt)[6:]}",
                      lambda qp=qp, kv=kv, bt=bt, cu=cu, sl=sl: _err(dk.mla_prefill(qp, kv, bt, cu, sl, 0.05),
                                                                     ref.mla_prefill_ref(qp, kv, bt, cu, sl, 0.05)),
                      2e-2 if dt == bf else 1e-4))

    for B, T, H, V, dt in ((4, 128, 512, 8192, bf), (2, 33, 64, 1000, f32)):
        hid, w = rn(B, T, H, dt=dt), rn(V, H, dt=dt, scale=H**-0.5)
        tgt = torch.randint(0, V, (B, T), generator=g).to(dev)
        mask = torch.ones(B, T, dtype=torch.bool, device=dev)
        adv = rn(B)
        tol = 2e-2 if dt == bf else 1e-4
        cases.append(("token_logprobs", f"B{B} T{T} H{H} V{V} {str(dt)[6:]}",
                      lambda hid=hid, w=w, tgt=tgt: _err(dk.token_logprobs(hid, w, tgt),
                                                         ref.token_logprobs_ref(hid, w, tgt)), tol))

        def run_loss(hid=hid, w=w, tgt=tgt, mask=mask, adv=adv):
            a = [t.detach().requires_grad_(True) for t in (hid, w)]
            b = [t.detach().requires_grad_(True) for t in (hid, w)]
            loss, _ = dk.grpo_loss(*a, tgt, mask, adv)
            loss_ref, _ = ref.grpo_loss_ref(*b, tgt, mask, adv)
            ga, gb = torch.autograd.grad(loss, a), torch.autograd.grad(loss_ref, b)
            return max([_err(loss, loss_ref)] + [_err(p, q) for p, q in zip(ga, gb)])
        cases.append(("grpo_loss", f"B{B} T{T} H{H} V{V} {str(dt)[6:]} fwd+bwd", run_loss, tol))

    # FP8 block-scaled (issue 17): W8A8 (sm_89+) and weight-only, dense at V3's q_a_proj shape, grouped, the layer
    w8a8 = dev.type != "cuda" or torch.cuda.get_device_capability(dev) >= (8, 9)
    for M, N, Kd in ((300, 1536, 7168), (5, 200, 300)):
        a = rn(M, Kd, dt=bf)
        wq, ws = dk.quantize_fp8_blocks(rn(N, Kd, scale=Kd**-0.5))
        if w8a8:
            def run(a=a, wq=wq, ws=ws):
                q, s = dk.quantize_fp8_groups(a)
                return _err(dk.fp8_gemm(q, wq, ws, a_scale=s), ref.fp8_gemm_ref(q, wq, ws, s))
            cases.append(("fp8_gemm", f"W8A8 M{M} N{N} K{Kd}", run, 2e-2))
        cases.append(("fp8_gemm", f"W8A16 M{M} N{N} K{Kd}",
                      lambda a=a, wq=wq, ws=ws: _err(dk.fp8_gemm(a, wq, ws), ref.fp8_gemm_ref(a, wq, ws)), 2e-2))
    for M, E in ((512, 8), (3, 4)):  # grouped, with an empty expert at the small shape
        a = rn(M, 1024, dt=bf)
        gw, gs = dk.quantize_fp8_blocks(rn(E, 512, 1024, scale=1024**-0.5))
        off = torch.tensor([M * e // E for e in range(E + 1)], dtype=i32).to(dev)
        if w8a8:
            def run(a=a, gw=gw, gs=gs, off=off):
                q, s = dk.quantize_fp8_groups(a)  # the quantiser too: dequantised, against the reference's
                deq = ref.dequantize_fp8_groups_ref
                return max(_err(deq(q, s), deq(*ref.quantize_fp8_groups_ref(a))),
                           _err(dk.grouped_gemm_fp8(q, gw, gs, off, a_scale=s),
                                ref.grouped_gemm_fp8_ref(q, gw, gs, off, s)))
            cases.append(("grouped_gemm_fp8", f"W8A8 M{M} E{E} N512 K1024", run, 2e-2))
        cases.append(("grouped_gemm_fp8", f"W8A16 M{M} E{E} N512 K1024", lambda a=a, gw=gw, gs=gs, off=off: _err(
            dk.grouped_gemm_fp8(a, gw, gs, off), ref.grouped_gemm_fp8_ref(a, gw, gs, off)), 2e-2))
    for T, H, I, E, K in ((256, 512, 256, 16, 4), (3, 256, 160, 4, 2)):  # noqa: E741
        x = rn(T, H, dt=bf)
        g13 = [dk.quantize_fp8_blocks(rn(E, I, H, scale=H**-0.5)) for _ in range(2)]  # gate, up: own blocks
        w13, s13 = torch.cat([g13[0][0], g13[1][0]], 1), torch.cat([g13[0][1], g13[1][1]], 1)
        w2, s2 = dk.quantize_fp8_blocks(rn(E, H, I, scale=I**-0.5))
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(dev, i32)
        wts = torch.softmax(rn(T, K), -1)
        act = "fp8" if w8a8 else "native"
        cases.append(("moe_experts_fp8", f"T{T} H{H} I{I} E{E} K{K} {act}",
                      lambda x=x, w13=w13, s13=s13, w2=w2, s2=s2, wts=wts, ids=ids, act=act: _err(
                          dk.moe_experts_fp8(x, w13, s13, w2, s2, wts, ids, activation=act),
                          ref.moe_experts_fp8_ref(x.float(), w13, s13, w2, s2, wts, ids, act == "fp8")), 3e-2))

    for n, G in ((64, 8), (5, 5)):
        r = rn(n)
        cases.append(("group_advantages", f"{n} rewards, groups of {G}",
                      lambda r=r, G=G: _err(dk.group_advantages(r, G), ref.group_advantages_ref(r, G)), 1e-6))
    for B, L in ((256, 131072), (1, 17)):
        cases.append(("plan_decode", f"B{B} max_seq_len {L}",
                      lambda B=B, L=L: 0.0 if dk.plan_decode(B, L, device=dev).num_splits >= 1 else 1.0, 0.0))
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    t0 = time.time()
    results = []
    try:
        cases = _cases(dev)
    except Exception as e:  # noqa: BLE001 - report, do not die
        print(f"setup crashed: {type(e).__name__}: {e}")
        traceback.print_exc()
        return 1
    for op, shape, run, tol in cases:
        _dispatch.reset()
        t = time.time()
        try:
            err = run()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            backends = sorted({b for (o, b) in _dispatch.launch_counts() if o == op})
            status = "ok" if err <= tol else "wrong"
            detail = f"backend {','.join(backends) or 'none'}, max rel err {err:.2e} (tol {tol:g})"
        except dk.FallbackError as e:
            status, detail = "fell back", str(e)
        except Exception as e:  # noqa: BLE001 - one line per op, whatever happened
            status, detail = "crashed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        results.append({"op": op, "shape": shape, "status": status, "detail": detail,
                        "seconds": round(time.time() - t, 2)})
        print(f"{op:<17} {shape:<42} {status:<9} {detail}", flush=True)
    bad = [r for r in results if r["status"] != "ok"]
    print(json.dumps({"ops_smoke": {"device": str(dev), "cases": len(results), "not_ok": len(bad),
                                    "seconds": round(time.time() - t0, 1)}}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
