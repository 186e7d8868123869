"""Bad input: a clear TypeError/ValueError naming the argument, raised before any kernel launches."""
import math
import os
import subprocess
import sys

import pytest
import torch

import fastlora
from conftest import HAS_TRITON


def good(**over):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(5, 8), bias=torch.randn(5),
                lora_A=torch.randn(3, 8), lora_B=torch.randn(5, 3), scaling=0.5)
    args.update(over)
    return args


BAD = [
    (dict(x=torch.randn(4, 7)), ValueError, "x's last dimension"),
    (dict(weight=torch.randn(5, 8, 1)), ValueError, "weight must be 2-D"),
    (dict(lora_A=torch.randn(3, 7)), ValueError, "lora_A must be"),
    (dict(lora_A=torch.randn(0, 8), lora_B=torch.randn(5, 0)), ValueError, "lora_A must be"),
    (dict(lora_B=torch.randn(5, 4)), ValueError, "lora_B must be"),
    (dict(lora_B=torch.randn(6, 3)), ValueError, "lora_B must be"),
    (dict(bias=torch.randn(6)), ValueError, "bias must be"),
    (dict(x=torch.randint(0, 3, (4, 8))), TypeError, "x must be float16"),
    (dict(lora_A=torch.randint(0, 3, (3, 8))), TypeError, "lora_A must be float16"),
    (dict(x=torch.randn(4, 8, dtype=torch.float64)), TypeError, "x and weight must share a dtype"),
    (dict(bias=torch.randn(5, dtype=torch.float64)), TypeError, "bias must have x's dtype"),
    (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    (dict(scaling=math.inf), ValueError, "scaling must be a finite number"),
    (dict(scaling=math.nan), ValueError, "scaling must be a finite number"),
    (dict(scaling="0.5"), ValueError, "scaling must be a finite number"),
    (dict(dropout_p=1.0), ValueError, "dropout_p must be in [0, 1)"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p must be in [0, 1)"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(weight=torch.randn(0, 8), bias=None, lora_B=torch.randn(0, 3)), ValueError, "non-zero"),
]


@pytest.mark.parametrize("over,exc,msg", BAD, ids=[b[2].split()[0] + str(i) for i, b in enumerate(BAD)])
def test_bad_argument_is_named(over, exc, msg):
    with pytest.raises(exc, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        fastlora.lora_linear(**good(**over))


def test_devices_must_match():
    meta = torch.randn(3, 8, device="meta")
    with pytest.raises(ValueError, match="lora_A is on meta but x is on cpu"):
        fastlora.lora_linear(**good(lora_A=meta))


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_on_cpu_without_interpreter_is_refused():
    code = ("import torch, fastlora\n"
            "try:\n"
            "    fastlora.lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(1, 4),"
            " torch.randn(3, 1), 1.0, backend='triton')\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "backend='triton' needs CUDA tensors, got x on cpu" in out.stdout, out.stdout + out.stderr


def test_import_without_triton_works_and_falls_back():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, fastlora\n"
            "y = fastlora.lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(1, 4),"
            " torch.randn(3, 1), 1.0)\n"
            "try:\n"
            "    fastlora.lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(1, 4),"
            " torch.randn(3, 1), 1.0, backend='triton')\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "needs the triton package" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("kw,msg", [(dict(r=0), "r must be a positive int"),
                                    (dict(dropout=1.5), "dropout must be in"),
                                    (dict(alpha=math.inf), "alpha must be a finite"),
                                    (dict(backend="fast"), "backend must be one of"),
                                    (dict(init_lora_weights="pissa"), "init_lora_weights must be")])
def test_layer_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        fastlora.LoRALinear(8, 4, **kw)
