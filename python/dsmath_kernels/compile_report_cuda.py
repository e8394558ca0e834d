"""What the GPU will run, read from the compiled code without a GPU: registers, stack (spills), shared memory and
whether each main loop uses tensor cores (HGMMA = wgmma on sm_90, HMMA = mma.sync), from the SASS `cuobjdump`
prints. Two sources:
- the CUDA kernels of the compiled module (`build/*/CMakeFiles/_C.dir/csrc/*.cu.o`, or any cubin / object / .so
  with device code): `cuda_report()`;
- Triton kernels compiled for sm_90 on this machine (their cubin): `sass_summary(cubin)`, used by
  mla_decode_triton.compile_sm90.

    python -m dsmath_kernels.compile_report_cuda [--objects PATH ...] [--triton] [--json]

--triton adds the tensor-core decode kernel of mla_decode_triton.py, compiled for sm_90 at every spec (MLA 16 /
128 heads, shared-prefix tiles, GQA, fp8) and page sizes 16 and 64.

A main loop is a backward branch in the SASS; the report lists, per loop, its instruction count and how many
HGMMA / HMMA / FFMA, global loads (LDG), cp.async (LDGSTS), TMA (UTMALDG) and local-memory (LDL / STL: spills)
instructions it holds. Spills are also visible as a non-zero STACK in `cuobjdump -res-usage`."""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import tempfile

COUNTED = ("HGMMA", "HMMA", "FFMA", "LDGSTS", "UTMALDG", "LDG", "LDS", "LDL", "STL")


def cuobjdump() -> str | None:
    """The cuobjdump on PATH, else the one bundled with Triton."""
    exe = shutil.which("cuobjdump")
    if exe:
        return exe
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return path if os.path.exists(path) else None
    except ImportError:
        return None


def _run(args: list[str]) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def _functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """SASS text -> {function name: [(address, instruction)]}."""
    funcs: dict[str, list[tuple[int, str]]] = {}
    cur = None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+([^;]*);", line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2).strip()))
    return funcs


def _count(body: list[str]) -> dict[str, int]:
    out = {}
    for k in COUNTED:
        pat = re.compile(r"(^|[\s.!@P0-9])" + k + r"(\.|\s|$)")
        out[k] = sum(1 for t in body if pat.search(t) and not (k == "LDG" and "LDGSTS" in t))
    return out


def loops(ins: list[tuple[int, str]]) -> list[dict]:
    """Backward branches of one function's SASS -> [{start, end, instructions, HGMMA, ...}], outermost first."""
    out = []
    for addr, text in ins:
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            start = int(m.group(1), 16)
            body = [t for a, t in ins if start <= a <= addr]
            out.append({"start": hex(start), "end": hex(addr), "instructions": len(body), **_count(body)})
    return sorted(out, key=lambda d: -d["instructions"])


def res_usage(path: str) -> dict[str, dict[str, int]]:
    """`cuobjdump -res-usage` -> {function: {REG, STACK, SHARED, LOCAL}}."""
    text = _run([cuobjdump(), "-res-usage", path])
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            cur = m.group(1)
            continue
        if cur and "REG:" in line:
            out[cur] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            cur = None
    return out


def sass_summary(cubin: bytes | str) -> dict[str, dict]:
    """Per function of a cubin (bytes or path): registers, stack, shared, every loop's instruction counts, and
    the totals of spill instructions (LDL / STL) anywhere and inside the main (largest) loop."""
    with tempfile.TemporaryDirectory() as d:
        path = cubin
        if isinstance(cubin, bytes):
            path = os.path.join(d, "k.cubin")
            with open(path, "wb") as f:
                f.write(cubin)
        usage = res_usage(path)
        funcs = _functions(_run([cuobjdump(), "-sass", path]))
    out = {}
    for name, ins in funcs.items():
        ls = loops(ins)
        total = _count([t for _, t in ins])
        out[name] = {**usage.get(name, {}), "loops": ls, "spill_instructions": total["LDL"] + total["STL"],
                     "main_loop": ls[0] if ls else None}
    return out


def object_files(root: str = ".") -> list[str]:
    """The CUDA objects of the developer / wheel builds (one per .cu file)."""
    pats = ["build/*/CMakeFiles/_C.dir/csrc/*.cu.o", "build/*/*/CMakeFiles/_C.dir/csrc/*.cu.o"]
    found = sorted({p for pat in pats for p in glob.glob(os.path.join(root, pat))})
    by_name: dict[str, str] = {}
    for p in found:  # newest object per source file
        key = os.path.basename(p)
        if key not in by_name or os.path.getmtime(p) > os.path.getmtime(by_name[key]):
            by_name[key] = p
    return sorted(by_name.values())


def _demangle(name: str) -> str:
    exe = shutil.which("cu++filt") or shutil.which("c++filt")
    if not exe:
        return name
    try:
        return _run([exe, name]).strip() or name
    except (OSError, subprocess.CalledProcessError):
        return name


def cuda_report(objects: list[str]) -> list[dict]:
    """One row per kernel of the given objects: registers, stack, shared, main-loop tensor-core use, spills."""
    rows = []
    for obj in objects:
        for name, s in sass_summary(obj).items():
            main = s["main_loop"] or {}
            rows.append({"object": os.path.basename(obj), "kernel": _demangle(name), "registers": s.get("REG"),
                         "stack": s.get("STACK"), "shared": s.get("SHARED"),
                         "loops": len(s["loops"]), "main_loop_instructions": main.get("instructions", 0),
                         "main_loop_hgmma": main.get("HGMMA", 0), "main_loop_hmma": main.get("HMMA", 0),
                         "main_loop_ffma": main.get("FFMA", 0), "spill_instructions": s["spill_instructions"]})
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m dsmath_kernels.compile_report_cuda", description=__doc__)
    ap.add_argument("--objects", nargs="*", default=None, help="CUDA objects / cubins (default: build/*/...cu.o)")
    ap.add_argument("--triton", action="store_true", help="also compile mla_decode_triton's kernel for sm_90")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if cuobjdump() is None:
        raise SystemExit("cuobjdump not found (CUDA toolkit or triton's bundled copy)")
    objs = args.objects if args.objects else object_files()
    if not objs:
        raise SystemExit("no CUDA objects found: build first (bash tools/dev_build.sh) or pass --objects")
    rows = cuda_report(objs)
    tri = triton_report() if args.triton else []
    if args.json:
        print(json.dumps({"cuda": rows, "triton": tri}))
        return rows + tri
    print(f"{'object':<22}{'kernel':<64}{'regs':>5}{'stack':>6}{'smem':>7}{'loop ins':>9}{'HGMMA':>6}{'HMMA':>6}"
          f"{'FFMA':>6}{'spill ins':>10}")
    for r in rows:
        k = r["kernel"] if len(r["kernel"]) <= 62 else r["kernel"][:59] + "..."
        print(f"{r['object']:<22}{k:<64}{r['registers']:>5}{r['stack']:>6}{r['shared']:>7}"
              f"{r['main_loop_instructions']:>9}{r['main_loop_hgmma']:>6}{r['main_loop_hmma']:>6}"
              f"{r['main_loop_ffma']:>6}{r['spill_instructions']:>10}")
    if tri:
        print(f"\n{'triton kernel (sm_90)':<24}{'page':>5}{'warps':>6}{'regs':>5}{'stack':>6}{'smem':>8}{'HGMMA':>6}"
              f"{'HMMA':>5}{'cp.async':>9}{'local':>6}")
        for r in tri:
            print(f"{r['kernel']:<24}{r['page_size']:>5}{r['num_warps']:>6}{r['registers']:>5}{r['stack']:>6}"
                  f"{r['shared_bytes']:>8}{r['main_loop_hgmma']:>6}{r['main_loop_hmma']:>5}"
                  f"{r['main_loop_cp_async']:>9}{r['local_instructions']:>6}")
    print(json.dumps({"report": "compile_cuda", "kernels": rows, "triton": tri}))
    return rows + tri


def triton_report() -> list[dict]:
    """mla_decode_triton.compile_report() in a subprocess without TRITON_INTERPRET (it must compile for real)."""
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = ("import json; from dsmath_kernels import mla_decode_triton as m; "
            "print(json.dumps(m.compile_report((16, 64))))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
