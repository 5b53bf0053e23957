// A fused ExpanderEncode kernel, for benchmarks/native_encode.py: what a native onnxruntime kernel for
// ai.saecompress::ExpanderEncode could do that standard ONNX ops cannot (nothing materialised per gathered input).
//
// Rows are taken BLOCK at a time and transposed to [m, BLOCK], so each mask entry (latent i, dim idx[i][j]) is one
// gather of BLOCK contiguous floats and one vectorised multiply-add into pre[i][0..BLOCK); latents go in chunks
// that stay in cache, and each row keeps a running top-k (a min-heap that rejects most values at its root).
//
// Reads a binary problem file written by native_encode.py (m, n, d, k, batch, then indices int32 [n, d], values
// float32 [n, d], b_enc [n], x [batch, m]); writes top values and indices for the parity check; prints seconds per
// call (median of `calls`) on stdout.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

namespace {
constexpr int BLOCK = 16;    // rows per block: one or two SIMD registers per multiply-add
constexpr int CHUNK = 2048;  // latents per chunk: CHUNK x BLOCK floats of pre-activations stay in L2

struct Problem {
  int32_t m, n, d, k, batch;
  std::vector<int32_t> indices;
  std::vector<float> values, b_enc, x;
};

bool read_problem(const char* path, Problem& p) {
  FILE* f = std::fopen(path, "rb");
  if (!f) return false;
  int32_t head[5];
  bool ok = std::fread(head, sizeof head, 1, f) == 1;
  if (ok) {
    p.m = head[0], p.n = head[1], p.d = head[2], p.k = head[3], p.batch = head[4];
    p.indices.resize(size_t(p.n) * p.d), p.values.resize(size_t(p.n) * p.d), p.b_enc.resize(p.n);
    p.x.resize(size_t(p.batch) * p.m);
    ok = std::fread(p.indices.data(), 4, p.indices.size(), f) == p.indices.size() &&
         std::fread(p.values.data(), 4, p.values.size(), f) == p.values.size() &&
         std::fread(p.b_enc.data(), 4, p.b_enc.size(), f) == p.b_enc.size() &&
         std::fread(p.x.data(), 4, p.x.size(), f) == p.x.size();
  }
  std::fclose(f);
  return ok;
}

// top_values / top_indices: [batch, k], each row sorted by descending value.
void encode(const Problem& p, std::vector<float>& top_values, std::vector<int64_t>& top_indices) {
  const int m = p.m, n = p.n, d = p.d, k = p.k;
  std::vector<float> xt(size_t(m) * BLOCK), pre(size_t(CHUNK) * BLOCK);
  using Entry = std::pair<float, int64_t>;
  std::vector<std::vector<Entry>> heaps(BLOCK);
  for (int start = 0; start < p.batch; start += BLOCK) {
    const int rows = std::min(BLOCK, p.batch - start);
    std::fill(xt.begin(), xt.end(), 0.0f);
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < m; ++c) xt[size_t(c) * BLOCK + r] = p.x[size_t(start + r) * m + c];
    for (auto& h : heaps) h.clear();
    for (int first = 0; first < n; first += CHUNK) {
      const int last = std::min(n, first + CHUNK);
      for (int i = first; i < last; ++i) {
        float* out = &pre[size_t(i - first) * BLOCK];
        const float bias = p.b_enc[i];
        for (int r = 0; r < BLOCK; ++r) out[r] = bias;
        for (int j = 0; j < d; ++j) {
          const float v = p.values[size_t(i) * d + j];
          const float* in = &xt[size_t(p.indices[size_t(i) * d + j]) * BLOCK];
          for (int r = 0; r < BLOCK; ++r) out[r] += v * in[r];
        }
      }
      for (int r = 0; r < rows; ++r) {  // running top-k: a min-heap of the k largest so far
        auto& h = heaps[r];
        for (int i = first; i < last; ++i) {
          const float value = pre[size_t(i - first) * BLOCK + r];
          if (int(h.size()) < k) {
            h.emplace_back(value, i);
            std::push_heap(h.begin(), h.end(), std::greater<Entry>());
          } else if (value > h.front().first) {
            std::pop_heap(h.begin(), h.end(), std::greater<Entry>());
            h.back() = Entry(value, i);
            std::push_heap(h.begin(), h.end(), std::greater<Entry>());
          }
        }
      }
    }
    for (int r = 0; r < rows; ++r) {
      auto& h = heaps[r];
      std::sort(h.begin(), h.end(), [](const Entry& a, const Entry& b) { return a.first > b.first; });
      for (int s = 0; s < k; ++s) {
        top_values[size_t(start + r) * k + s] = std::max(h[s].first, 0.0f);  // topk_relu: ReLU on the kept
        top_indices[size_t(start + r) * k + s] = h[s].second;
      }
    }
  }
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: native_encode PROBLEM OUT CALLS\n");
    return 2;
  }
  Problem p;
  if (!read_problem(argv[1], p)) {
    std::fprintf(stderr, "cannot read %s\n", argv[1]);
    return 2;
  }
  std::vector<float> values(size_t(p.batch) * p.k);
  std::vector<int64_t> indices(size_t(p.batch) * p.k);
  std::vector<double> seconds;
  for (int call = 0; call < std::atoi(argv[3]); ++call) {
    auto t0 = std::chrono::steady_clock::now();
    encode(p, values, indices);
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(seconds.begin(), seconds.end());
  FILE* out = std::fopen(argv[2], "wb");
  if (!out) return 2;
  std::fwrite(values.data(), 4, values.size(), out);
  std::fwrite(indices.data(), 8, indices.size(), out);
  std::fclose(out);
  std::printf("%.9f\n", seconds[seconds.size() / 2]);
  return 0;
}
