// Runs kernels/lora.cu on the CPU, one std::thread per CUDA thread, and
// checks every entry point against a plain double-precision definition: a
// check of the kernels' indexing, tiling and synchronisation for machines
// without a GPU. It says nothing about speed, and a CPU thread schedule is
// only one of the schedules a GPU may pick.
//
//   g++ -std=c++20 -O1 -pthread -o /tmp/lora-emulate kernels/emulate.cpp && /tmp/lora-emulate
//
// The launches use the strides and index lists src/model/cuda_lora.rs uses.

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <thread>
#include <vector>

// The CUDA surface lora.cu uses, for one block at a time.
struct Dim3 {
    unsigned x = 0, y = 0, z = 0;
};
static thread_local Dim3 threadIdx, blockIdx;
static std::unique_ptr<std::barrier<>> block_barrier;
static std::unique_ptr<std::barrier<>> warp_barriers[32];
static float warp_exchange[32][32];

static void __syncthreads() { block_barrier->arrive_and_wait(); }

static float __shfl_xor_sync(unsigned, float v, int offset) {
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    warp_exchange[warp][lane] = v;
    warp_barriers[warp]->arrive_and_wait();
    const float other = warp_exchange[warp][lane ^ offset];
    warp_barriers[warp]->arrive_and_wait();
    return other;
}

static float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

static unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}

using std::min;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
// Blocks run one after another, so a function-level static is one block's shared memory.
#define __shared__ static

#include "lora.cu"

// One launch: every block in turn, THREADS threads each.
static void launch(unsigned grid_x, unsigned grid_y, const std::function<void()>& kernel) {
    for (unsigned by = 0; by < grid_y; ++by) {
        for (unsigned bx = 0; bx < grid_x; ++bx) {
            block_barrier = std::make_unique<std::barrier<>>(THREADS);
            for (auto& w : warp_barriers) w = std::make_unique<std::barrier<>>(32);
            std::vector<std::thread> threads;
            for (unsigned t = 0; t < THREADS; ++t) {
                threads.emplace_back([&, t] {
                    threadIdx = {t, 0, 0};
                    blockIdx = {bx, by, 0};
                    kernel();
                });
            }
            for (auto& t : threads) t.join();
        }
    }
}

static float from_bits(bf16_bits b) { return __uint_as_float(((unsigned)b) << 16); }

static bf16_bits to_bits(float v) {
    bf16_bits b;
    store(&b, v);
    return b;
}

template <typename T> struct Elem;
template <> struct Elem<float> {
    static float get(float v) { return v; }
    static float put(float v) { return v; }
    static constexpr const char* name = "f32";
    static constexpr double tolerance = 1e-5;
};
template <> struct Elem<bf16_bits> {
    static float get(bf16_bits v) { return from_bits(v); }
    static bf16_bits put(float v) { return to_bits(v); }
    static constexpr const char* name = "bf16";
    static constexpr double tolerance = 1.5e-2;
};

static int failures = 0;

template <typename T>
static void expect(const char* what, const std::vector<T>& got, const std::vector<double>& want,
                   const char* label) {
    double scale = 1e-30, worst = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        scale = std::max(scale, std::fabs(want[i]));
        const double d = std::fabs(Elem<T>::get(got[i]) - want[i]);
        worst = std::isnan(d) ? NAN : std::max(worst, d);
    }
    const double err = worst / scale;
    const bool ok = err <= Elem<T>::tolerance;
    if (!ok) ++failures;
    std::printf("  %-4s %-36s %-3s %.2e %s\n", Elem<T>::name, label, what, err, ok ? "ok" : "OVER");
}

struct Case {
    int tokens, inner, out, rank, head_dim, every;
    bool rows;  // adapter on selected output rows (q/k/v), else input columns (o)
    bool dense; // no index lists: full-size A and B, B zero outside the selected rows
};

template <typename T> static void run_case(const Case& c, unsigned seed) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-1, 1);
    std::vector<unsigned> sel;
    const int features = c.rows || c.dense ? c.out : c.inner;
    for (int f = 0; f < features; ++f) {
        if ((f / c.head_dim) % c.every == 1) sel.push_back(f);
    }
    const bool rows = c.rows && !c.dense, cols = !c.rows && !c.dense;
    const int n_rows = rows ? (int)sel.size() : c.out;
    const int n_cols = cols ? (int)sel.size() : c.inner;
    auto row_of = [&](int j) { return rows ? (int)sel[j] : j; };
    auto col_of = [&](int i) { return cols ? (int)sel[i] : i; };
    auto fill = [&](size_t n, float bound) {
        std::vector<T> v(n);
        for (auto& e : v) e = Elem<T>::put(u(rng) * bound);
        return v;
    };
    auto x = fill((size_t)c.tokens * c.inner, 1), g = fill((size_t)c.tokens * c.out, 1);
    auto a = fill((size_t)c.rank * n_cols, 0.3), b = fill((size_t)n_rows * c.rank, 0.3);
    auto base_y = fill((size_t)c.tokens * c.out, 1);
    auto base_dx = fill((size_t)c.tokens * c.inner, 1);
    if (c.dense) {
        for (int j = 0; j < n_rows; ++j) {
            const bool on = std::find(sel.begin(), sel.end(), (unsigned)j) != sel.end();
            for (int k = 0; k < c.rank && !on; ++k) b[j * c.rank + k] = Elem<T>::put(0);
        }
    }
    const unsigned* row_idx = rows ? sel.data() : nullptr;
    const unsigned* col_idx = cols ? sel.data() : nullptr;
    const float s = 1.5f;
    auto at = [](const std::vector<T>& v, size_t i) { return (double)Elem<T>::get(v[i]); };

    // The definitions, in double.
    std::vector<double> t(c.tokens * c.rank, 0), ub(c.tokens * c.rank, 0);
    for (int tok = 0; tok < c.tokens; ++tok) {
        for (int k = 0; k < c.rank; ++k) {
            double& tk = t[tok * c.rank + k];
            double& uk = ub[tok * c.rank + k];
            for (int i = 0; i < n_cols; ++i) {
                tk += at(x, tok * c.inner + col_of(i)) * at(a, k * n_cols + i);
            }
            for (int j = 0; j < n_rows; ++j) {
                uk += at(g, tok * c.out + row_of(j)) * at(b, j * c.rank + k);
            }
        }
    }
    std::vector<double> want_y(base_y.size()), want_dx(base_dx.size());
    for (size_t i = 0; i < base_y.size(); ++i) want_y[i] = at(base_y, i);
    for (size_t i = 0; i < base_dx.size(); ++i) want_dx[i] = at(base_dx, i);
    std::vector<double> want_da(c.rank * n_cols, 0), want_db(n_rows * c.rank, 0);
    for (int tok = 0; tok < c.tokens; ++tok) {
        for (int k = 0; k < c.rank; ++k) {
            const double tk = t[tok * c.rank + k], uk = ub[tok * c.rank + k];
            for (int j = 0; j < n_rows; ++j) {
                want_y[tok * c.out + row_of(j)] += s * tk * at(b, j * c.rank + k);
                want_db[j * c.rank + k] += s * at(g, tok * c.out + row_of(j)) * tk;
            }
            for (int i = 0; i < n_cols; ++i) {
                want_dx[tok * c.inner + col_of(i)] += s * uk * at(a, k * n_cols + i);
                want_da[k * n_cols + i] += s * uk * at(x, tok * c.inner + col_of(i));
            }
        }
    }

    // The launches of cuda_lora.rs, every overwritten buffer starting as NaN.
    const unsigned tiles = (c.tokens + TILE_TOKENS - 1) / TILE_TOKENS;
    const unsigned chunks = std::max(1, (c.tokens + OUTER_TOKENS - 1) / OUTER_TOKENS);
    auto y = base_y;
    launch(tiles, 1, [&] {
        low_rank_add<T>(y.data(), c.out, row_idx, n_rows, x.data(), c.inner, col_idx, n_cols,
                        a.data(), n_cols, 1, b.data(), c.rank, 1, nullptr, c.tokens, c.rank, s);
    });
    auto dx = base_dx;
    std::vector<float> u_low(c.tokens * c.rank, NAN), t_low(c.tokens * c.rank, NAN);
    launch(tiles, 1, [&] {
        low_rank_add<T>(dx.data(), c.inner, col_idx, n_cols, g.data(), c.out, row_idx, n_rows,
                        b.data(), 1, c.rank, a.data(), 1, n_cols, u_low.data(), c.tokens, c.rank,
                        s);
    });
    launch(tiles, 1, [&] {
        low_rank_add<T>(nullptr, 0, nullptr, 0, x.data(), c.inner, col_idx, n_cols, a.data(),
                        n_cols, 1, a.data(), 0, 0, t_low.data(), c.tokens, c.rank, s);
    });
    std::vector<float> partial(chunks * std::max(n_rows, n_cols) * c.rank, NAN);
    std::vector<T> da(c.rank * n_cols, Elem<T>::put(NAN)), db(n_rows * c.rank, Elem<T>::put(NAN));
    const unsigned col_blocks = (n_cols + THREADS - 1) / THREADS;
    const unsigned row_blocks = (n_rows + THREADS - 1) / THREADS;
    launch(col_blocks, chunks, [&] {
        outer_partial<T>(partial.data(), x.data(), c.inner, col_idx, n_cols, u_low.data(),
                         c.tokens, c.rank);
    });
    launch((n_cols * c.rank + THREADS - 1) / THREADS, 1, [&] {
        outer_finish<T>(da.data(), 1, n_cols, partial.data(), chunks, n_cols, c.rank, s);
    });
    std::fill(partial.begin(), partial.end(), NAN);
    launch(row_blocks, chunks, [&] {
        outer_partial<T>(partial.data(), g.data(), c.out, row_idx, n_rows, t_low.data(),
                         c.tokens, c.rank);
    });
    launch((n_rows * c.rank + THREADS - 1) / THREADS, 1, [&] {
        outer_finish<T>(db.data(), c.rank, 1, partial.data(), chunks, n_rows, c.rank, s);
    });

    char label[96];
    const char* side = c.dense ? "dense" : rows ? "rows" : "cols";
    std::snprintf(label, sizeof label, "%s t%d in%d out%d r%d", side, c.tokens, c.inner, c.out,
                  c.rank);
    expect("y", y, want_y, label);
    expect("dx", dx, want_dx, label);
    expect("dA", da, want_da, label);
    expect("dB", db, want_db, label);
}

int main() {
    const Case cases[] = {
        {37, 256, 256, 8, 32, 3, true, false},
        {37, 256, 256, 16, 32, 2, false, false},
        {300, 300, 120, 20, 20, 2, true, false},
        {300, 320, 192, 33, 32, 3, false, false},
        {65, 192, 160, 4, 32, 2, true, true},
    };
    unsigned seed = 1;
    for (const auto& c : cases) {
        run_case<float>(c, seed++);
        run_case<bf16_bits>(c, seed++);
    }
    std::printf("%s\n", failures ? "FAILED" : "all within bounds");
    return failures ? 1 : 0;
}
