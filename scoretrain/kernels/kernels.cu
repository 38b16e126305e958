// scoretrain's CUDA kernels: the straight-through gradient, the optimizer updates, and an exact
// top-k without a sort (a radix select over the bits of |x|). CuPy compiles this file with NVRTC
// (cupy.RawModule, kernels.py: cuda()); tests/test_nvrtc.py compiles it the same way, with
// CuPy's own options, for sm_80 and sm_90, on a machine without a GPU.
//
// Float arithmetic is written with __f*_rn intrinsics: rounded after every operation, as NumPy
// rounds, so a GPU step gives the CPU's bits (CUDA would otherwise contract a * b + c into one
// FMA; the compile test checks the PTX for that). Element loops are grid-stride loops over n.

#define MAGNITUDE 0x7FFFFFFFu  // |x|'s bits: x's without the sign bit; they order like |x| (NaN above all)
#define RADIX_BITS 8
#define BINS 256               // 1 << RADIX_BITS
#define THREADS 256            // threads per block of the top-k kernels
#define ITEMS 16               // consecutive elements per thread in topk_mask
#define CHUNK 4096             // THREADS * ITEMS: elements per block of the top-k kernels

extern "C" {

// --- the straight-through gradient and the optimizers -----------------------------------------

// g *= w * sign(s), s's sign bit for its sign (s == +0 keeps g * w): dL/dW_eff -> dL/dS.
__global__ void straight_through(float* g, const float* w, const float* s, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float v = __fmul_rn(g[i], w[i]);
        g[i] = signbit(s[i]) ? -v : v;
    }
}

// optim.SGD: g += wd * p; buf = mu * buf + g; p -= lr * (g + mu * buf if nesterov else buf). The
// learning rate is read from the device (*lr), so that a CUDA graph of the step serves every epoch.
__global__ void sgd(float* p, float* buf, const float* g, const float* lr_at, float mu, float wd, int nesterov, long long n) {
    float lr = *lr_at;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float x = p[i], d = g[i];
        if (wd != 0.0f) d = __fadd_rn(d, __fmul_rn(x, wd));
        if (mu != 0.0f) {
            float b = __fadd_rn(__fmul_rn(buf[i], mu), d);
            buf[i] = b;
            d = nesterov ? __fadd_rn(d, __fmul_rn(b, mu)) : b;
        }
        p[i] = __fsub_rn(x, __fmul_rn(d, lr));
    }
}

// optim.Adam: g += wd * p; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g g; p -= step m / (sqrt(v / c2) + eps).
__global__ void adam(float* p, float* m, float* v, const float* g, float step_size, float b1, float one_minus_b1,
                     float b2, float one_minus_b2, float c2, float eps, float wd, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float x = p[i], d = g[i];
        if (wd != 0.0f) d = __fadd_rn(d, __fmul_rn(x, wd));
        float mi = __fadd_rn(__fmul_rn(m[i], b1), __fmul_rn(d, one_minus_b1));
        float vi = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fmul_rn(d, d), one_minus_b2));
        m[i] = mi;
        v[i] = vi;
        p[i] = __fsub_rn(x, __fmul_rn(__fdiv_rn(mi, __fadd_rn(__fsqrt_rn(__fdiv_rn(vi, c2)), eps)), step_size));
    }
}

// --- the exact top-k, all groups at once (radix_select.py drives these and has their CPU model) ---
// A group is a span [bounds[2g], bounds[2g + 1]) of the flat scores x (as uint32 bits) that keeps
// kept[g] values. Block b covers CHUNK elements of group blk_group[b] from blk_start[b]; a group's
// blocks are consecutive, group_blocks[g] .. group_blocks[g + 1]. state[3g .. 3g + 2]: the
// threshold's bits found so far (prefix), how many of the values equal to it on those bits are
// still to keep (remaining), and after the last pass how many equal it (ties).
//
// Four passes of (topk_histogram, topk_pick), one per 8-bit digit from the top, find the k-th
// largest |x| exactly; then topk_count_ties, topk_scan_ties and topk_mask keep every value above
// it and the first `remaining` equal to it by index: the first k of a stable descending sort.

__device__ long long span_end(const long long* bounds, int g, long long start) {
    long long end = bounds[2 * g + 1];
    return start + CHUNK < end ? start + CHUNK : end;
}

// hist[g][digit] += the values of the block whose higher digits equal the prefix.
__global__ void topk_histogram(const unsigned int* x, const long long* bounds, const int* blk_group,
                               const long long* blk_start, const unsigned int* state, unsigned int* hist, int shift) {
    __shared__ unsigned int local[BINS];
    int g = blk_group[blockIdx.x];
    long long start = blk_start[blockIdx.x], end = span_end(bounds, g, start);
    unsigned int high = shift == 32 - RADIX_BITS ? 0u : 0xFFFFFFFFu << (shift + RADIX_BITS);
    unsigned int prefix = state[3 * g] & high;
    for (int b = threadIdx.x; b < BINS; b += blockDim.x) local[b] = 0;
    __syncthreads();
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        unsigned int key = x[i] & MAGNITUDE;
        if ((key & high) == prefix) atomicAdd(&local[(key >> shift) & (BINS - 1)], 1u);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < BINS; b += blockDim.x)
        if (local[b]) atomicAdd(&hist[g * BINS + b], local[b]);
}

// One thread per group: the digit of the k-th largest, from the top bin down; zeroes the bins.
__global__ void topk_pick(unsigned int* hist, unsigned int* state, const unsigned int* kept, int n_groups, int shift) {
    int g = blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= n_groups) return;
    bool first = shift == 32 - RADIX_BITS;
    unsigned int prefix = first ? 0u : state[3 * g], remaining = first ? kept[g] : state[3 * g + 1];
    unsigned int* h = hist + g * BINS;
    unsigned int above = 0;
    int digit = 0;
    for (int b = BINS - 1; b >= 0; b--) {
        if (above + h[b] >= remaining) {
            digit = b;
            break;
        }
        above += h[b];
    }
    state[3 * g] = prefix | ((unsigned int)digit << shift);
    state[3 * g + 1] = remaining - above;
    state[3 * g + 2] = h[digit];
    for (int b = 0; b < BINS; b++) h[b] = 0;
}

// blk_ties[b] = how many values of block b equal its group's threshold.
__global__ void topk_count_ties(const unsigned int* x, const long long* bounds, const int* blk_group,
                                const long long* blk_start, const unsigned int* state, unsigned int* blk_ties) {
    __shared__ unsigned int count;
    int g = blk_group[blockIdx.x];
    long long start = blk_start[blockIdx.x], end = span_end(bounds, g, start);
    unsigned int t = state[3 * g], c = 0;
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) c += (x[i] & MAGNITUDE) == t;
    if (c) atomicAdd(&count, c);
    __syncthreads();
    if (threadIdx.x == 0) blk_ties[blockIdx.x] = count;
}

// One thread per group: blk_ties becomes the ties before each block in the group (exclusive scan).
__global__ void topk_scan_ties(unsigned int* blk_ties, const int* group_blocks, int n_groups) {
    int g = blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= n_groups) return;
    unsigned int before = 0;
    for (int b = group_blocks[g]; b < group_blocks[g + 1]; b++) {
        unsigned int v = blk_ties[b];
        blk_ties[b] = before;
        before += v;
    }
}

// mask = |x| above the threshold, or equal to it and among the first `remaining` such by index;
// with_w: w_out = w * mask too (a float multiply, as NumPy's: -0.0 where a negative w is dropped).
__global__ void topk_mask(const unsigned int* x, const long long* bounds, const int* blk_group, const long long* blk_start,
                          const unsigned int* state, const unsigned int* blk_ties, bool* mask, const float* w, float* w_out,
                          int with_w) {
    __shared__ unsigned int before[THREADS];
    int g = blk_group[blockIdx.x];
    long long start = blk_start[blockIdx.x], end = span_end(bounds, g, start);
    long long first = start + (long long)threadIdx.x * ITEMS, last = first + ITEMS < end ? first + ITEMS : end;
    unsigned int t = state[3 * g], need = state[3 * g + 1], c = 0;
    for (long long i = first; i < last; i++) c += (x[i] & MAGNITUDE) == t;
    before[threadIdx.x] = c;
    __syncthreads();
    if (threadIdx.x == 0) {  // the ties before each thread's elements: an exclusive scan over the block
        unsigned int acc = blk_ties[blockIdx.x];
        for (int j = 0; j < blockDim.x; j++) {
            unsigned int v = before[j];
            before[j] = acc;
            acc += v;
        }
    }
    __syncthreads();
    unsigned int rank = before[threadIdx.x];
    for (long long i = first; i < last; i++) {
        unsigned int key = x[i] & MAGNITUDE;
        bool kept = key > t || (key == t && rank++ < need);
        mask[i] = kept;
        if (with_w) w_out[i] = __fmul_rn(w[i], kept ? 1.0f : 0.0f);
    }
}

// --- the elementwise chains of a layer's backward pass and of the loss -----------------------------

// layers.ReLU.backward: out = d * (y > 0), one pass (the array code's two and a bool temporary).
__global__ void relu_backward(const float* d, const float* y, float* out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = __fmul_rn(d[i], y[i] > 0.0f ? 1.0f : 0.0f);
}

// layers.Conv2d.backward's col2im as a gather, kernels.col2im's sums: dx ([n, h, w, c], the
// input's gradient without the padding) at (b, y, x, ch) sums dcols [n, ho, wo, k, k, c] over the
// patches that read it, in the array code's order, (i, j) ascending from 0. A thread per element of
// dx; none writes another's.
__global__ void col2im(const float* dcols, float* dx, int n, int ho, int wo, int k, int c, int h, int w,
                       int stride, int pad) {
    long long total = (long long)n * h * w * c;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total; e += (long long)gridDim.x * blockDim.x) {
        int ch = e % c;
        long long r = e / c;
        int xp = r % w + pad, yp = (r / w) % h + pad;
        long long b = r / ((long long)w * h);
        float acc = 0.0f;
        for (int i = 0; i < k; i++) {
            int ty = yp - i;
            if (ty < 0 || ty % stride || ty / stride >= ho) continue;
            for (int j = 0; j < k; j++) {
                int tx = xp - j;
                if (tx < 0 || tx % stride || tx / stride >= wo) continue;
                acc = __fadd_rn(acc, dcols[((((b * ho + ty / stride) * wo + tx / stride) * k + i) * k + j) * c + ch]);
            }
        }
        dx[e] = acc;
    }
}

// model.cross_entropy in one block of THREADS threads: for each row i of the logits x [n, c] (a
// thread per row), z = x - max, s = sum exp(z), loss_i = log(s) - z[y_i], correct_i = (the first
// argmax == y_i), and with `grad` dx = (exp(z) / s - onehot(y_i)) / n. The block then sums loss_i
// and correct_i over a fixed tree, so a batch gives the same bits on every run (no atomics). It
// calls CUDA's expf and logf, whose library code uses FMAs: their roundings are not the CPU's
// libm's anyway (the one kernel the compile test lets contract).
__global__ void cross_entropy(const float* x, const long long* y, int n, int c, int grad, float* dx, float* loss,
                              long long* correct) {
    __shared__ float part_loss[THREADS];
    __shared__ long long part_ok[THREADS];
    float l = 0.0f;
    long long ok = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float* row = x + (long long)i * c;
        int best = 0;
        float m = row[0];
        for (int j = 1; j < c; j++)
            if (row[j] > m) { m = row[j]; best = j; }
        float s = 0.0f;
        for (int j = 0; j < c; j++) s = __fadd_rn(s, expf(__fsub_rn(row[j], m)));
        long long t = y[i];
        l = __fadd_rn(l, __fsub_rn(logf(s), __fsub_rn(row[t], m)));
        ok += best == t;
        if (grad) {
            float* out = dx + (long long)i * c;
            for (int j = 0; j < c; j++) {
                float p = __fdiv_rn(expf(__fsub_rn(row[j], m)), s);
                if (j == t) p = __fsub_rn(p, 1.0f);
                out[j] = __fdiv_rn(p, (float)n);
            }
        }
    }
    part_loss[threadIdx.x] = l;
    part_ok[threadIdx.x] = ok;
    __syncthreads();
    for (int w = THREADS / 2; w > 0; w >>= 1) {
        if (threadIdx.x < w) {
            part_loss[threadIdx.x] = __fadd_rn(part_loss[threadIdx.x], part_loss[threadIdx.x + w]);
            part_ok[threadIdx.x] += part_ok[threadIdx.x + w];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        *loss = part_loss[0];
        *correct = part_ok[0];
    }
}

}  // extern "C"
