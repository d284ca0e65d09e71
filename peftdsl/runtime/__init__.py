"""The executing wing: lowered plans run as batched torch operations (execute, kernels, tensor I/O)."""
