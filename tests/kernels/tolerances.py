"""Tolerances shared by the kernel tests (each test file says why they fit its op).

Every output is compared with the fp32 reference of the same (dtype-exact) inputs. A kernel that
computes in fp32 and rounds once is within 1 ulp of that: 2**-7 |v| in bf16, 2**-10 |v| in fp16
(the interpreter truncates instead of rounding, still 1 ulp). rtol allows 2 ulps; atol covers
outputs that round to about 0.
"""

import pytest
import torch

BF16_REL = 2.0**-7
FP16_REL = 2.0**-10

#: "dtype, atol, rtol" triples for kernels that accumulate in fp32 and round once.
DTYPE_TOLS = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 1e-5, 2 * BF16_REL, id="bf16"),
    pytest.param(torch.float16, 1e-5, 2 * FP16_REL, id="fp16"),
]
