// qlora-studio's CUDA kernels, compiled to PTX by build.rs when the `cuda` feature is on and
// launched from candle custom ops (src/cuda.rs). Every kernel's arithmetic has a Rust twin that
// the CPU tests check bit for bit or against the fixtures; the comment above each kernel names it.
//
// Floating-point rules that keep GPU and CPU results identical: products and sums that the CPU
// does as separate f32 operations use __fmul_rn / __fadd_rn here, so that nvcc cannot contract
// them into one fused multiply-add (a different rounding); conversions round to nearest even.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// ------------------------------------------------------------------------ NF4 dequantization
// Twin: Nf4Tensor::dequantize_into (src/quant/nf4.rs) and docs/nf4.md §4, §5.4. bitsandbytes
// stores two codes per byte, the even element in the high nibble; a block's scale is a plain
// f32, or with double quantization nested_code[code] * nested_absmax[b / nested_blocksize] +
// offset (one rounding per operation).

__constant__ float NF4_CODE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// One thread per packed byte (two elements); blocksize is even, so both lie in one block.
template <typename T, bool DOUBLE>
__device__ void nf4_dequant(const uint8_t *packed, const float *absmax, const uint8_t *absmax_codes,
                            const float *nested_absmax, const float *nested_code, float offset,
                            uint32_t nested_blocksize, uint64_t n, uint32_t blocksize, T *out) {
    uint64_t n_bytes = (n + 1) / 2;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n_bytes;
         i += (uint64_t)gridDim.x * blockDim.x) {
        uint64_t e = 2 * i;
        uint64_t b = e / blocksize;
        float scale;
        if (DOUBLE) {
            scale = __fadd_rn(__fmul_rn(nested_code[absmax_codes[b]], nested_absmax[b / nested_blocksize]), offset);
        } else {
            scale = absmax[b];
        }
        uint8_t byte = packed[i];
        out[e] = from_f32<T>(__fmul_rn(NF4_CODE[byte >> 4], scale));
        if (e + 1 < n) out[e + 1] = from_f32<T>(__fmul_rn(NF4_CODE[byte & 0x0f], scale));
    }
}

#define NF4_KERNELS(NAME, T)                                                                        \
    extern "C" __global__ void nf4_dequant_plain_##NAME(const uint8_t *packed, const float *absmax,   \
                                                        uint64_t n, uint32_t blocksize, T *out) {     \
        nf4_dequant<T, false>(packed, absmax, nullptr, nullptr, nullptr, 0.0f, 1, n, blocksize, out); \
    }                                                                                               \
    extern "C" __global__ void nf4_dequant_double_##NAME(                                            \
        const uint8_t *packed, const uint8_t *absmax_codes, const float *nested_absmax,             \
        const float *nested_code, float offset, uint32_t nested_blocksize, uint64_t n,               \
        uint32_t blocksize, T *out) {                                                               \
        nf4_dequant<T, true>(packed, nullptr, absmax_codes, nested_absmax, nested_code, offset,      \
                             nested_blocksize, n, blocksize, out);                                  \
    }

NF4_KERNELS(f32, float)
NF4_KERNELS(bf16, __nv_bfloat16)
NF4_KERNELS(f16, __half)

// ------------------------------------------------------------------------------ LoRA dropout
// Twin: dropout_keeps and dropout_mul_cpu (src/lora/mod.rs). Element i of a module's mask is
// the (i+1)-th SplitMix64 output from the module's key: kept when its top 24 bits, as a
// fraction of 2^24 (exact in f32), are at least p; kept elements are scaled by 1/(1-p) in f32.
// Counter-based, so the forward and the backward (and a resumed run) draw the same mask
// without storing it.

__device__ __forceinline__ uint64_t splitmix64_nth(uint64_t key, uint64_t i) {
    uint64_t z = key + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

template <typename T>
__device__ void dropout_mul(const T *x, T *y, uint64_t n, uint64_t key, float p, float keep_scale) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        float u = __fmul_rn((float)(uint32_t)(splitmix64_nth(key, i) >> 40), 1.0f / 16777216.0f);
        y[i] = u >= p ? from_f32<T>(__fmul_rn(to_f32(x[i]), keep_scale)) : from_f32<T>(0.0f);
    }
}

#define DROPOUT_KERNEL(NAME, T)                                                                     \
    extern "C" __global__ void dropout_mul_##NAME(const T *x, T *y, uint64_t n, uint64_t key, float p, \
                                                  float keep_scale) {                               \
        dropout_mul<T>(x, y, n, key, p, keep_scale);                                                \
    }

DROPOUT_KERNEL(f32, float)
DROPOUT_KERNEL(bf16, __nv_bfloat16)
DROPOUT_KERNEL(f16, __half)

// ------------------------------------------------------------------------ attention softmax
// Twin: MaskedSoftmax and SoftmaxBwd (src/model/ops.rs). One block per row of scores
// [rows, keys]; row r is the query at query_start + r % queries of head (r / queries) % heads.
// Keys after the query, or `window` or more positions before it, get probability exactly 0;
// ALiBi adds slope[head] · key position. Probabilities are f32 whatever the scores' dtype.

#define SOFTMAX_THREADS 256

// The reduction of one value per thread over the block (max or sum), returned to every thread.
template <bool MAX> __device__ float block_reduce(float v) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) {
        float other = __shfl_xor_sync(0xffffffff, v, o);
        v = MAX ? fmaxf(v, other) : v + other;
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads(); // partial may still be read by a previous call
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = lane < warps ? partial[lane] : (MAX ? -INFINITY : 0.0f);
    for (int o = 16; o > 0; o >>= 1) {
        float other = __shfl_xor_sync(0xffffffff, v, o);
        v = MAX ? fmaxf(v, other) : v + other;
    }
    return v;
}

template <typename T>
__device__ void masked_softmax(const T *x, float *y, uint32_t keys, uint32_t queries, uint32_t heads,
                               uint64_t query_start, uint64_t key_start, uint64_t window, float scale,
                               const float *slopes, uint32_t has_slopes) {
    uint64_t row = blockIdx.x;
    const T *xr = x + row * keys;
    float *yr = y + row * keys;
    uint64_t q1 = query_start + row % queries + 1; // one past the query's position
    uint64_t hi = q1 > key_start ? q1 - key_start : 0;
    if (hi > keys) hi = keys;
    uint64_t lo = 0;
    if (window > 0) {
        uint64_t first = q1 > window ? q1 - window : 0;
        lo = first > key_start ? first - key_start : 0;
        if (lo > hi) lo = hi;
    }
    float slope = has_slopes ? slopes[(row / queries) % heads] : 0.0f;
    float key0 = (float)key_start;
    float m = -INFINITY;
    for (uint64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
        float v = __fadd_rn(__fmul_rn(to_f32(xr[j]), scale), __fmul_rn(slope, __fadd_rn(key0, (float)j)));
        m = fmaxf(m, v);
    }
    m = block_reduce<true>(m);
    float sum = 0.0f;
    for (uint64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
        float v = __fadd_rn(__fmul_rn(to_f32(xr[j]), scale), __fmul_rn(slope, __fadd_rn(key0, (float)j)));
        float e = expf(v - m);
        yr[j] = e;
        sum += e;
    }
    sum = block_reduce<false>(sum);
    for (uint64_t j = threadIdx.x; j < keys; j += blockDim.x) {
        yr[j] = (j >= lo && j < hi) ? yr[j] / sum : 0.0f;
    }
}

#define SOFTMAX_KERNEL(NAME, T)                                                                     \
    extern "C" __global__ void masked_softmax_##NAME(const T *x, float *y, uint32_t keys, uint32_t queries, \
                                                     uint32_t heads, uint64_t query_start,           \
                                                     uint64_t key_start, uint64_t window, float scale, \
                                                     const float *slopes, uint32_t has_slopes) {     \
        masked_softmax<T>(x, y, keys, queries, heads, query_start, key_start, window, scale, slopes,   \
                          has_slopes);                                                              \
    }

SOFTMAX_KERNEL(f32, float)
SOFTMAX_KERNEL(bf16, __nv_bfloat16)
SOFTMAX_KERNEL(f16, __half)

// dx = y · (g − Σ g·y) per row, all f32.
extern "C" __global__ void softmax_backward_f32(const float *y, const float *g, float *dx, uint32_t n) {
    uint64_t row = blockIdx.x;
    const float *yr = y + row * n, *gr = g + row * n;
    float *dr = dx + row * n;
    float dot = 0.0f;
    for (uint32_t j = threadIdx.x; j < n; j += blockDim.x) dot += yr[j] * gr[j];
    dot = block_reduce<false>(dot);
    for (uint32_t j = threadIdx.x; j < n; j += blockDim.x) dr[j] = yr[j] * (gr[j] - dot);
}
