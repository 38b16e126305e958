"""Test infrastructure: the CUDA kernels executed on the CPU (cuda_executor), the strict CuPy
stand-in that runs the device path with them (strict_cupy), and a real single-node Slurm
(slurm_cluster)."""
