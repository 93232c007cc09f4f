// CPU attention against a paged KV cache, and the cache write. The tile of attention_tile.h reads
// key rows through the block table in place; when few (sequence, kv head) tiles have long
// contexts (decode), their keys are split across threads and the partial softmax states merged.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../attention.h"
#include "attention_tile.h"

namespace msmartcompute {
namespace {

using cpu::kBlockK;
using cpu::kBlockQ;

template <typename T>
void paged_fwd(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
               const std::vector<int64_t>& lens, const at::Tensor& block_table, at::Tensor& out, const PagedShape& s,
               float scale) {
  const int64_t D = s.D, G = s.H / s.Hkv, R = G * s.Sq, q_blocks = (R + kBlockQ - 1) / kBlockQ;
  const int64_t tiles = s.B * s.Hkv * q_blocks;
  const int64_t longest = *std::max_element(lens.begin(), lens.end());
  // Split-KV: about two tasks per thread, each at least 4 key blocks long.
  const int64_t want = (2 * at::get_num_threads() + tiles - 1) / tiles;
  const int64_t splits = std::max<int64_t>(1, std::min(want, longest / (4 * kBlockK)));
  const int64_t chunk = ((longest + splits - 1) / splits + kBlockK - 1) / kBlockK * kBlockK;
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k_cache.const_data_ptr<T>();
  const T* vp = v_cache.const_data_ptr<T>();
  const int32_t* bt = block_table.const_data_ptr<int32_t>();
  T* op = out.mutable_data_ptr<T>();
  const auto qs = q.strides(), ks = k_cache.strides(), vs = v_cache.strides(), bts = block_table.strides();
  std::vector<cpu::TileState> parts(splits > 1 ? tiles * splits : 0, cpu::TileState(D));

  // Tile `tile` (b, kv head, query block); packed row r is query (i0 + r) % Sq of head hk * G + (i0 + r) / Sq.
  struct Tile {
    int64_t b, hk, i0, nq;
  };
  auto tile_of = [&](int64_t tile) {
    const int64_t head = tile / q_blocks, i0 = (tile % q_blocks) * kBlockQ;
    return Tile{head / s.Hkv, head % s.Hkv, i0, std::min(kBlockQ, R - i0)};
  };
  auto attend = [&](const Tile& t, cpu::TileBuffers& buf, cpu::TileState& state, int64_t k_lo, int64_t k_hi) {
    const int64_t len = lens[t.b];
    auto head_of = [&](int64_t r) { return t.hk * G + (t.i0 + r) / s.Sq; };
    auto pos_of = [&](int64_t r) { return (t.i0 + r) % s.Sq; };
    auto q_row = [&](int64_t r) { return qp + t.b * qs[0] + pos_of(r) * qs[1] + head_of(r) * qs[2]; };
    auto cached = [&](const T* base, c10::IntArrayRef cs, int64_t j) {
      const int64_t block = bt[t.b * bts[0] + (j / s.block_size) * bts[1]];
      return base + block * cs[0] + (j % s.block_size) * cs[1] + t.hk * cs[2];
    };
    auto k_row = [&](int64_t j) { return cached(kp, ks, j); };
    auto v_row = [&](int64_t j) { return cached(vp, vs, j); };
    auto key_end = [&](int64_t r) { return pos_of(r) + len - s.Sq + 1; };
    cpu::load_queries<T>(buf, t.nq, D, scale, q_row);
    state.reset(t.nq, D);
    cpu::attend_keys<T>(buf, state, t.nq, D, k_lo, std::min(k_hi, len), k_row, v_row, key_end);
  };
  auto finish = [&](const Tile& t, const cpu::TileState& state) {
    cpu::finish_rows<T>(
        state, t.nq, D,
        [&](int64_t r) { return op + ((t.b * s.Sq + (t.i0 + r) % s.Sq) * s.H + t.hk * G + (t.i0 + r) / s.Sq) * D; },
        [](int64_t, float) {});
  };

  if (splits == 1) {
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      cpu::TileBuffers buf(D);
      cpu::TileState state(D);
      for (int64_t tile = begin; tile < end; ++tile) {
        const Tile t = tile_of(tile);
        attend(t, buf, state, 0, lens[t.b]);
        finish(t, state);
      }
    });
    return;
  }
  at::parallel_for(0, tiles * splits, 1, [&](int64_t begin, int64_t end) {
    cpu::TileBuffers buf(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t split = task % splits;
      attend(tile_of(task / splits), buf, parts[task], split * chunk, (split + 1) * chunk);
    }
  });
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const Tile t = tile_of(tile);
      for (int64_t split = 1; split < splits; ++split)
        cpu::merge_tiles(parts[tile * splits], parts[tile * splits + split], t.nq, D);
      finish(t, parts[tile * splits]);
    }
  });
}

at::Tensor paged_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_table, const at::Tensor& seq_lens, double scale) {
  const char* op = "paged_attention";
  const auto s = check_paged_inputs(op, q, k_cache, v_cache, block_table, seq_lens);
  cpu::check_cpu_float(op, q);
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.numel() == 0) return out;
  // Every block a sequence reads must exist: a bad table would read outside the cache.
  auto lens32 = seq_lens.contiguous();
  std::vector<int64_t> lens(lens32.const_data_ptr<int32_t>(), lens32.const_data_ptr<int32_t>() + s.B);
  const int32_t* bt = block_table.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < s.B; ++b) {
    TORCH_CHECK(lens[b] >= 0 && lens[b] <= s.max_blocks * s.block_size, op, ": seq_lens[", b, "] = ", lens[b],
                " is outside [0, max_blocks * block_size = ", s.max_blocks * s.block_size, "]");
    for (int64_t i = 0; i < (lens[b] + s.block_size - 1) / s.block_size; ++i) {
      const int64_t block = bt[b * block_table.stride(0) + i * block_table.stride(1)];
      TORCH_CHECK(block >= 0 && block < s.num_blocks, op, ": block_table[", b, ", ", i, "] = ", block,
                  " is not a block of the cache (", s.num_blocks, " blocks)");
    }
  }
  auto qc = cpu::last_dim_contiguous(q), kc = cpu::last_dim_contiguous(k_cache),
       vc = cpu::last_dim_contiguous(v_cache);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "paged_attention_cpu", [&] {
    paged_fwd<scalar_t>(qc, kc, vc, lens, block_table, out, s, static_cast<float>(scale));
  });
  return out;
}

// cache[slot / block_size, slot % block_size] = src[n] for every token n with slot >= 0; the
// cache is written through its own strides (it may be a view).
template <typename T>
void write_cache(const at::Tensor& src, at::Tensor& cache, const int64_t* slots) {
  const int64_t heads = src.size(1), D = src.size(2), block_size = cache.size(1);
  const auto ss = src.strides(), cs = cache.strides();
  const T* sp = src.const_data_ptr<T>();
  T* cp = cache.mutable_data_ptr<T>();
  at::parallel_for(0, src.size(0), 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      if (slots[n] < 0) continue;
      T* row = cp + (slots[n] / block_size) * cs[0] + (slots[n] % block_size) * cs[1];
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t d = 0; d < D; ++d) row[h * cs[2] + d * cs[3]] = sp[n * ss[0] + h * ss[1] + d * ss[2]];
    }
  });
}

void reshape_and_cache_cpu(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                           const at::Tensor& slot_mapping) {
  const char* op = "reshape_and_cache";
  check_cache_write(op, k, v, k_cache, v_cache, slot_mapping);
  cpu::check_cpu_float(op, k);
  auto slots = slot_mapping.contiguous();
  const int64_t* sp = slots.const_data_ptr<int64_t>();
  const int64_t capacity = k_cache.size(0) * k_cache.size(1);
  for (int64_t n = 0; n < slots.numel(); ++n) {
    TORCH_CHECK(sp[n] < capacity, op, ": slot_mapping[", n, "] = ", sp[n], " is past the cache's ", capacity,
                " slots");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "reshape_and_cache_cpu", [&] {
    write_cache<scalar_t>(k, k_cache, sp);
    write_cache<scalar_t>(v, v_cache, sp);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(msmartcompute, CPU, m) {
  m.impl("paged_attention", &paged_attention_cpu);
  m.impl("reshape_and_cache", &reshape_and_cache_cpu);
}

}  // namespace msmartcompute
