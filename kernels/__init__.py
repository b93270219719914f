"""TVM TensorIR kernels and schedules the stock TVM wheel lacks."""
