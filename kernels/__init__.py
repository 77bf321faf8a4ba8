"""memlayer.kernels: page scoring and paged sparse attention; torch reference and Triton on CUDA."""
