// The CPU executor of a CUDA module (tests/cuda_executor.py builds and drives it): kernels.cu,
// compiled as it is against cuda_runtime.h, linked with this file and a generated table of its
// kernels (dispatch.cpp), under AddressSanitizer and UndefinedBehaviorSanitizer.
//
// A launch's blocks run one after another, in an order permuted by the launch's seed. A block's
// threads run as fibers in an order
// permuted by the launch's seed: each runs until it reaches __syncthreads or returns; once every
// live thread waits at the barrier, they go on, in a new order. So a thread that reads what
// another writes without a barrier between them reads it or not depending on the seed, and a
// missing __syncthreads changes the result instead of passing by luck. The block's __shared__
// variables are filled with random bytes before it starts, so a read of shared memory that no
// thread wrote is a wrong result too. Every kernel argument that is an array is a buffer of
// exactly its size (malloc'd, so ASan knows its bounds): one element past it is an error.
//
// Protocol, on stdin/stdout, all integers little-endian:
//   argv[1]: a file of the __shared__ variables, "function address size" per line (from nm;
//   -no-pie: fixed addresses); argv[2] "ftz": flush subnormals to zero, as CuPy's -ftz=true.
//   request:  u32 kernel (index into KERNELS, or 0xFFFFFFFF to quit), u32 grid[3], u32 block[3],
//             u64 seed, u32 n_buffers, per buffer {u64 bytes, u8 written, the bytes},
//             u32 n_args, per argument {u8 kind: 0 buffer (u32 index), 1 value (u32 size, bytes),
//             2 null pointer}
//   response: u32 0, then each written buffer's bytes, in order.
// A sanitizer's error ends the process with its report on stderr: the driver reads it from there.

#include <sanitizer/common_interface_defs.h>
#include <xmmintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda_runtime.h"

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

struct Kernel {
    const char* name;
    void (*call)(void** params);  // params[i] points to the i-th argument's bytes, as cuLaunchKernel's
};
extern const Kernel KERNELS[];
extern const unsigned N_KERNELS;

namespace {

constexpr size_t STACK = 256 * 1024;  // per fiber; ASan's frames are larger than plain ones

// switch_stack(save, next): saves the callee-saved registers and the floating-point control words
// on this stack, stores its pointer in *save, and resumes the stack `next` as saved the same way.
// (swapcontext does the same plus two system calls for the signal mask: 30x slower here.)
extern "C" void switch_stack(void** save, void* next);
asm(R"(
    .text
    .globl switch_stack
    .type switch_stack, @function
switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size switch_stack, .-switch_stack
    .section .note.GNU-stack,"",@progbits
    .text
)");

struct Fiber {
    void* sp;  // its saved stack pointer while it does not run
    char* stack;
    unsigned thread;  // the linear thread index it runs
    bool parked;      // waits at a barrier (else it has returned)
};

void* scheduler_sp = nullptr;
const void* scheduler_stack = nullptr;  // the scheduler's stack, for ASan's fiber switches
size_t scheduler_stack_size = 0;
Fiber* current = nullptr;
std::vector<Fiber*> idle;
void (*kernel)(void**) = nullptr;
void** params = nullptr;
std::vector<unsigned> fresh;  // the block's threads not yet started, in the order they start
size_t next_fresh = 0;

uint64_t rng_state;
uint64_t next_random() {  // xorshift64*: the seeded orders and garbage bytes
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

template <typename T> void shuffle(std::vector<T>& v) {
    for (size_t i = v.size(); i > 1; i--) std::swap(v[i - 1], v[next_random() % i]);
}

void set_thread(unsigned t) {
    if (blockDim.y == 1 && blockDim.z == 1) {  // the usual 1-d block: no divisions
        threadIdx = {t, 0, 0};
        return;
    }
    threadIdx.x = t % blockDim.x;
    threadIdx.y = t / blockDim.x % blockDim.y;
    threadIdx.z = t / (blockDim.x * blockDim.y);
}

void to_fiber(Fiber* f) {  // the scheduler runs f until it parks or runs out of fresh threads
    current = f;
    set_thread(f->thread);
    void* fake_stack = nullptr;
    __sanitizer_start_switch_fiber(&fake_stack, f->stack, STACK);
    switch_stack(&scheduler_sp, f->sp);
    __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
}

void to_scheduler() {
    Fiber* self = current;
    void* fake_stack = nullptr;
    __sanitizer_start_switch_fiber(&fake_stack, scheduler_stack, scheduler_stack_size);
    switch_stack(&self->sp, scheduler_sp);
    __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
}

[[noreturn]] void fiber_main() {  // runs fresh threads one after another; parks inside __syncthreads
    __sanitizer_finish_switch_fiber(nullptr, &scheduler_stack, &scheduler_stack_size);
    for (;;) {
        while (next_fresh < fresh.size()) {
            current->thread = fresh[next_fresh++];
            set_thread(current->thread);
            kernel(params);
        }
        current->parked = false;
        to_scheduler();
    }
}

Fiber* take_fiber() {
    if (!idle.empty()) {
        Fiber* f = idle.back();
        idle.pop_back();
        return f;
    }
    Fiber* f = new Fiber();
    f->stack = static_cast<char*>(malloc(STACK));
    // A stack as switch_stack leaves one: 7 saved registers (zeros), then fiber_main as the
    // return address, at a 16-byte boundary (so fiber_main starts as if it had been called).
    auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(f->stack + STACK) & ~uintptr_t(15)) - 2;
    top[0] = reinterpret_cast<uint64_t>(&fiber_main);
    uint64_t* sp = top - 7;
    for (int i = 0; i < 7; i++) sp[i] = 0;
    uint32_t control[2] = {_mm_getcsr(), 0x037F};  // MXCSR (FTZ included) and x87's default control word
    memcpy(sp, control, sizeof control);
    f->sp = sp;
    return f;
}

struct SharedVariable {
    unsigned char* address;
    size_t size;
};
std::vector<std::vector<SharedVariable>> shared_variables;  // per kernel: its own and its helpers'

void run_block(unsigned index, unsigned threads) {
    for (auto& v : shared_variables[index])  // garbage: what no thread of this block wrote
        for (size_t i = 0; i < v.size; i++) v.address[i] = static_cast<unsigned char>(next_random() >> 56);
    fresh.resize(threads);
    for (unsigned t = 0; t < threads; t++) fresh[t] = t;
    shuffle(fresh);
    next_fresh = 0;
    std::vector<Fiber*> parked;
    while (next_fresh < fresh.size()) {  // every thread runs to its first barrier (or its end)
        Fiber* f = take_fiber();
        f->thread = fresh[next_fresh];
        to_fiber(f);
        (f->parked ? parked : idle).push_back(f);
    }
    while (!parked.empty()) {  // all live threads wait at a barrier: release them, in a new order
        std::vector<Fiber*> ready;
        ready.swap(parked);
        shuffle(ready);
        for (Fiber* f : ready) {
            to_fiber(f);
            (f->parked ? parked : idle).push_back(f);
        }
    }
}

template <typename T> T read_value() {
    T v;
    if (fread(&v, sizeof v, 1, stdin) != 1) exit(0);  // the driver has gone: so do we
    return v;
}

void read_bytes(void* p, size_t n) {
    if (n && fread(p, 1, n, stdin) != n) exit(0);
}

}  // namespace

extern "C" void __syncthreads() {
    current->parked = true;
    to_scheduler();
    set_thread(current->thread);
}

int main(int argc, char** argv) {
    shared_variables.resize(N_KERNELS);
    if (argc > 1) {  // "function address size" per line; a function that is no kernel: a helper of all
        FILE* f = fopen(argv[1], "r");
        char function[256];
        unsigned long long address, size;
        while (f && fscanf(f, "%255s %llx %llx", function, &address, &size) == 3)
            for (unsigned k = 0; k < N_KERNELS; k++) {
                bool helper = true;
                for (unsigned j = 0; j < N_KERNELS; j++) helper = helper && strcmp(KERNELS[j].name, function) != 0;
                if (helper || strcmp(KERNELS[k].name, function) == 0)
                    shared_variables[k].push_back({reinterpret_cast<unsigned char*>(address), static_cast<size_t>(size)});
            }
        if (f) fclose(f);
    }
    if (argc > 2 && strcmp(argv[2], "ftz") == 0)  // CuPy compiles with -ftz=true: subnormals flush to 0
        _mm_setcsr(_mm_getcsr() | 0x8040);       // FTZ | DAZ
    for (;;) {
        unsigned index = read_value<uint32_t>();
        if (index >= N_KERNELS) return 0;
        unsigned grid[3], block[3];
        for (auto& g : grid) g = read_value<uint32_t>();
        for (auto& b : block) b = read_value<uint32_t>();
        rng_state = read_value<uint64_t>() * 0x9E3779B97F4A7C15ULL + 1;
        unsigned n_buffers = read_value<uint32_t>();
        std::vector<void*> buffers(n_buffers);
        std::vector<size_t> sizes(n_buffers);
        std::vector<bool> written(n_buffers);
        for (unsigned i = 0; i < n_buffers; i++) {
            sizes[i] = read_value<uint64_t>();
            written[i] = read_value<uint8_t>();
            buffers[i] = malloc(sizes[i]);  // exactly the array's bytes
            read_bytes(buffers[i], sizes[i]);
        }
        unsigned n_args = read_value<uint32_t>();
        std::vector<std::vector<unsigned char>> values(n_args);
        std::vector<void*> pointers(n_args);
        for (unsigned i = 0; i < n_args; i++) {
            uint8_t kind = read_value<uint8_t>();
            if (kind == 1) {
                values[i].resize(read_value<uint32_t>());
                read_bytes(values[i].data(), values[i].size());
            } else {
                void* p = kind == 0 ? buffers[read_value<uint32_t>()] : nullptr;
                values[i].resize(sizeof p);
                memcpy(values[i].data(), &p, sizeof p);
            }
            pointers[i] = values[i].data();
        }
        kernel = KERNELS[index].call;
        params = pointers.data();
        gridDim = {grid[0], grid[1], grid[2]};
        blockDim = {block[0], block[1], block[2]};
        std::vector<unsigned long long> order(static_cast<unsigned long long>(grid[0]) * grid[1] * grid[2]);
        for (size_t b = 0; b < order.size(); b++) order[b] = b;
        shuffle(order);  // blocks, too, run in no particular order on a GPU
        for (unsigned long long b : order) {
            blockIdx = {static_cast<unsigned>(b % grid[0]), static_cast<unsigned>(b / grid[0] % grid[1]),
                        static_cast<unsigned>(b / (static_cast<unsigned long long>(grid[0]) * grid[1]))};
            run_block(index, block[0] * block[1] * block[2]);
        }
        uint32_t ok = 0;
        fwrite(&ok, sizeof ok, 1, stdout);
        for (unsigned i = 0; i < n_buffers; i++) {
            if (written[i]) fwrite(buffers[i], 1, sizes[i], stdout);
            free(buffers[i]);
        }
        fflush(stdout);
    }
}
