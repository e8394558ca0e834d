// pybind11 registration of the tiled / shared-prefix attention launchers (attn_cascade_cpu.cpp). The many
// parameters of a pass travel as one dict named like attn::AttendParams' fields (python/dsmath_kernels/cascade.py
// builds it), so call sites stay readable and a missing field is a KeyError naming it.
#include "dsmath/bind.h"
#include "dsmath/cascade.h"

namespace dsmath {

namespace {

template <typename T>
T field(const py::dict& d, const char* name) {
  if (!d.contains(name)) throw py::key_error(std::string("attend params: missing field ") + name);
  return d[name].cast<T>();
}

attn::AttendParams attend_params(const py::dict& d) {
  attn::AttendParams p{};
  p.q = as_ptr<const void>(field<uintptr_t>(d, "q"));
  p.q_sb = field<int64_t>(d, "q_sb");
  p.q_sh = field<int64_t>(d, "q_sh");
  p.q_dtype = field<int>(d, "q_dtype");
  p.k = as_ptr<const void>(field<uintptr_t>(d, "k"));
  p.k_sblk = field<int64_t>(d, "k_sblk");
  p.k_stok = field<int64_t>(d, "k_stok");
  p.k_sh = field<int64_t>(d, "k_sh");
  p.v = as_ptr<const void>(field<uintptr_t>(d, "v"));
  p.v_sblk = field<int64_t>(d, "v_sblk");
  p.v_stok = field<int64_t>(d, "v_stok");
  p.v_sh = field<int64_t>(d, "v_sh");
  p.kv_dtype = field<int>(d, "kv_dtype");
  p.k_scale = as_ptr<const float>(field<uintptr_t>(d, "k_scale"));
  p.ks_sblk = field<int64_t>(d, "ks_sblk");
  p.block_tables = as_ptr<const int32_t>(field<uintptr_t>(d, "block_tables"));
  p.bt_sb = field<int64_t>(d, "bt_sb");
  p.bt_width = field<int>(d, "bt_width");
  p.seq_lens = as_ptr<const int32_t>(field<uintptr_t>(d, "seq_lens"));
  p.start = as_ptr<const int32_t>(field<uintptr_t>(d, "start"));
  p.tiles = as_ptr<const int32_t>(field<uintptr_t>(d, "tiles"));
  p.num_tiles = field<int>(d, "num_tiles");
  p.members = as_ptr<const int32_t>(field<uintptr_t>(d, "members"));
  p.heads_per_tile = field<int>(d, "heads_per_tile");
  p.out = as_ptr<void>(field<uintptr_t>(d, "out"));
  p.part_o = as_ptr<float>(field<uintptr_t>(d, "part_o"));
  p.part_lse = as_ptr<float>(field<uintptr_t>(d, "part_lse"));
  p.slot0 = field<int>(d, "slot0");
  p.nslot = field<int>(d, "nslot");
  p.B = field<int>(d, "B");
  p.Hq = field<int>(d, "Hq");
  p.Hkv = field<int>(d, "Hkv");
  p.D = field<int>(d, "D");
  p.Dv = field<int>(d, "Dv");
  p.block_size = field<int>(d, "block_size");
  p.num_blocks = field<int>(d, "num_blocks");
  p.scale = field<float>(d, "scale");
  p.num_splits = field<int>(d, "num_splits");
  p.min_chunk = field<int>(d, "min_chunk");
  p.bad = as_ptr<int64_t>(field<uintptr_t>(d, "bad"));
  p.engine = field<int>(d, "engine");
  return p;
}

}  // namespace

void bind_cascade(py::module_& m) {
  m.def("attend_cpu", [](const py::dict& d, int num_threads) {
    attn::AttendParams p = attend_params(d);
    py::gil_scoped_release nogil;
    check(attend_cpu(p, num_threads), "attend_cpu");
  });
  m.def("attend_cpu_isa", &attend_cpu_isa, py::arg("engine") = 0,
        "Vector ISA of the CPU GEMM engine chosen for that engine code: avx512 | avx2 | portable");
  m.def("merge_partials_cpu", [](uintptr_t part_o, uintptr_t part_lse, uintptr_t out, int dtype, int64_t rows,
                                 int nslot, int Dv, int num_threads) {
    py::gil_scoped_release nogil;
    check(merge_partials_cpu(as_ptr<const float>(part_o), as_ptr<const float>(part_lse), as_ptr<void>(out), dtype,
                             rows, nslot, Dv, num_threads),
          "merge_partials_cpu");
  });
}

}  // namespace dsmath
