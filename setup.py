"""Build of the optional C extension; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "daop_vllm._cpu_experts",
            sources=["csrc/cpu_experts.c", "csrc/cpu_quantized.c", "csrc/cpu_pool.c", "csrc/cpu_router.cpp"],
            depends=["csrc/cpu_pool.h", "csrc/cpu_common.h"],
            extra_compile_args=["-O3", "-fno-exceptions"],  # the C++ of cpu_router.cpp throws nothing
            # Without a C compiler the package still installs; the executor then uses torch.
            optional=True,
        )
    ]
)
