"""The fast paths: the array backend (NumPy or CuPy), the CPU's fused numba loops, the CUDA
kernels (kernels.cu) and the GPU's exact top-k (radix_select). Imports nothing else of scoretrain
but its errors."""
