"""Which exceptions mean "the GPU ran out of memory": built here with the exact texts torch, cuBLAS, cuDNN, the
CUDA runtime and Triton produce (see runtime.failures.CUDA_OOM_MESSAGES for where each comes from)."""

from __future__ import annotations

import pytest
import torch

from lowmem_sdpo.runtime.failures import is_cuda_oom

CUDA_HINT = (
    "\nCUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below "
    "might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\n"
    "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n"
)

OUT_OF_MEMORY = {
    "allocator": torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.64 GiB of which "
        "1.06 GiB is free. Of the allocated memory 21.10 GiB is allocated by PyTorch"
    ),
    "allocator, top-level name": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"),
    "allocator, old torch": RuntimeError(
        "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 7.79 GiB total)"
    ),
    "cublas handle": RuntimeError(
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
    ),
    "cublasLt workspace": RuntimeError(
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasLtMatmul( ltHandle, computeDesc.descriptor(), "
        "&alpha_val, mat1_ptr, Adesc.descriptor(), mat2_ptr, Bdesc.descriptor(), &beta_val, result_ptr, "
        "Cdesc.descriptor(), result_ptr, Cdesc.descriptor(), &heuristicResult.algo, workspace.mutable_data_ptr(), "
        "workspaceSize, at::cuda::getCurrentCUDAStream())`"
    ),
    "cudnn 8": RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    "cudnn 9": RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"),
    "cuda runtime": torch.AcceleratorError("CUDA error: out of memory" + CUDA_HINT),
    "triton launcher": RuntimeError("Triton Error [CUDA]: out of memory"),
}

NOT_OUT_OF_MEMORY = {
    "device-side assert": torch.AcceleratorError("CUDA error: device-side assert triggered" + CUDA_HINT),
    "cublas execution": RuntimeError(
        "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb, m, n, k, "
        "&alpha, a, lda, b, ldb, &beta, c, ldc)`"
    ),
    "cudnn host allocation (CPU memory)": RuntimeError(
        "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED"
    ),
    "ordinary runtime error": RuntimeError("expected scalar type Float but found BFloat16"),
    "triton other": RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"),
    "value error with the words": ValueError("CUDA out of memory"),
    "host memory": MemoryError(),
    "interrupt": KeyboardInterrupt(),
}


@pytest.mark.parametrize("name", sorted(OUT_OF_MEMORY))
def test_recognised_as_cuda_out_of_memory(name):
    assert is_cuda_oom(OUT_OF_MEMORY[name])


@pytest.mark.parametrize("name", sorted(NOT_OUT_OF_MEMORY))
def test_not_cuda_out_of_memory(name):
    assert not is_cuda_oom(NOT_OUT_OF_MEMORY[name])


def test_raised_and_caught_like_the_engine_catches_it():
    # As run.py sees it: caught as a BaseException mid-step, the message formatted by torch (a c10 error's
    # str() may carry a C++ backtrace after the message; the pattern is a substring either way).
    with pytest.raises(RuntimeError) as caught:
        raise RuntimeError(
            "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`\n"
            "Exception raised from gemm at /pytorch/aten/src/ATen/cuda/CUDABlas.cpp:1234 (most recent call first):"
        )
    assert is_cuda_oom(caught.value)
