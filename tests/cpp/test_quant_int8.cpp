// C++ test of the CPU quantize op through the dispatcher, as a C++ user calls it.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "ok" : "FAIL", what);
  if (!ok) ++failures;
}

std::tuple<at::Tensor, at::Tensor> quantize(const at::Tensor& x, int64_t dim) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("msmartcompute::quantize_int8", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>();
  return op.call(x, dim);
}

}  // namespace

int main() {
  torch::manual_seed(0);
  auto x = torch::randn({7, 129}) * 5;
  auto [q, scale] = quantize(x, -1);

  // Reference: scale = absmax / 127; q = x times the reciprocal 127 / absmax (one true division
  // per row), rounded half to even (torch::round), clamped.
  auto absmax = x.abs().amax(-1, true);
  auto ref_scale = absmax / 127.0;
  auto ref_inv = torch::full_like(absmax, 127.0) / absmax;
  auto ref_q = torch::round(x * ref_inv).clamp(-127, 127).to(torch::kChar);
  expect(q.scalar_type() == torch::kChar, "q is int8");
  expect(q.sizes() == x.sizes(), "q has the shape of x");
  expect(torch::equal(scale, ref_scale.squeeze(-1)), "scale equals absmax / 127");
  expect(torch::equal(q, ref_q), "q equals round(x * (127 / absmax)) exactly");

  auto halves = torch::tensor({{127.f, 0.5f, 1.5f, 2.5f, -0.5f, -2.5f}});
  auto [qh, sh] = quantize(halves, -1);
  expect(torch::equal(qh, torch::tensor({{127, 0, 2, 2, 0, -2}}, torch::kChar)), "halves round to even");

  auto [qz, sz] = quantize(torch::zeros({2, 8}), -1);
  expect(torch::equal(sz, torch::ones({2})), "all-zero rows get scale 1");

  auto [qc, sc] = quantize(x, 0);
  expect(sc.sizes() == torch::IntArrayRef({129}), "per-column scale along dim 0");

  bool threw = false;
  try {
    quantize(torch::ones({3}, torch::kLong), -1);
  } catch (const c10::Error&) {
    threw = true;
  }
  expect(threw, "integer input is refused");

  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
