"""Tiny random Hugging Face models and their PEFT twins, for the tests against real transformers and
peft (nothing is downloaded). Tests call ``require_hf()`` first: it skips them without the extra."""
import copy
import re

import pytest
import torch

from helpers import DEVICE

# Largest max|fastlora - peft| / max|peft| allowed: both compute the same products in the same
# dtype, so they differ by a few roundings of the summation order at most.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
TARGETS = ["q_proj", "v_proj", "down_proj"]


def require_hf():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    return transformers, peft


def tiny_llama(dtype=torch.float32, seed=0, **overrides):
    """A 2-layer Llama, hidden 64, random init, on DEVICE, in eval mode."""
    transformers, _ = require_hf()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      **overrides)
    return transformers.LlamaForCausalLM(config).to(device=DEVICE, dtype=dtype).eval()


_SAVED = {}


def tiny_llama_4bit(targets=("q_proj", "v_proj"), quant_type="nf4", double_quant=True,
                    dtype=torch.float32, compute_dtype=torch.float32, seed=0):
    """``tiny_llama(dtype, seed)`` saved and loaded back through transformers with a
    BitsAndBytesConfig, its ``targets`` in bitsandbytes' 4-bit Linear4bit (the rest as they were),
    on the CPU, in eval mode. Skips without bitsandbytes."""
    import os
    import tempfile

    pytest.importorskip("bitsandbytes")
    transformers, _ = require_hf()
    key = (dtype, seed)
    if key not in _SAVED:
        _SAVED[key] = os.path.join(tempfile.mkdtemp(prefix="fastlora-tiny-"), "model")
        tiny_llama(dtype, seed).save_pretrained(_SAVED[key])
    linears = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=[m for m in linears if m not in targets])
    model = transformers.LlamaForCausalLM.from_pretrained(_SAVED[key], quantization_config=config,
                                                          dtype=dtype, device_map="cpu")
    return model.eval()


def peft_twin(base, target_modules=TARGETS, seed=1, **lora_kwargs):
    """``peft.get_peft_model`` on a copy of ``base`` with LoraConfig(r=8, lora_alpha=16,
    lora_dropout=0) unless overridden, and random non-zero lora_B (PEFT initialises it to zero)."""
    _, peft = require_hf()
    kwargs = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=target_modules)
    kwargs.update(lora_kwargs)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    randomize_lora_B(model, seed)
    return model.eval()


def randomize_lora_B(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)


def input_ids(batch=2, seq=7, seed=2):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


_LORA_NAME = re.compile(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.default)?(?:\.weight)?$")


def lora_key(name):
    """(module path in the base model, "A" | "B") for a LoRA parameter of PEFT's or fastlora's."""
    m = _LORA_NAME.match(name)
    return (m.group(1), m.group(2)) if m else None


def logits_and_lora_grads(model, ids):
    """Logits of ``model`` and the gradient of a fixed random projection of them with respect to
    every LoRA parameter, keyed by lora_key."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3),
                        dtype=torch.float64).to(logits.device, logits.dtype)
    (logits * probe).sum().backward()
    grads = {lora_key(n): p.grad.detach().clone() for n, p in model.named_parameters()
             if lora_key(n) is not None}
    return logits.detach(), grads


def max_err(actual, expected):
    """max |actual - expected| / max |expected|."""
    scale = expected.abs().max().item()
    assert scale > 0, "comparing against an all-zero tensor would prove nothing"
    return (actual.double() - expected.double()).abs().max().item() / scale


def assert_same_as_peft(ours, theirs, dtype, what=""):
    """Logits and every LoRA gradient of ``ours`` equal ``theirs`` within TOL[dtype]; returns the
    largest error seen."""
    (logits, grads), (ref_logits, ref_grads) = ours, theirs
    assert set(grads) == set(ref_grads) and grads, f"{what}: LoRA parameters differ"
    errs = {"logits": max_err(logits, ref_logits)}
    errs.update({f"grad {k}": max_err(grads[k], ref_grads[k]) for k in ref_grads})
    worst = max(errs, key=errs.get)
    assert errs[worst] <= TOL[dtype], f"{what}: {worst} differs by {errs[worst]:.3g} > {TOL[dtype]:g}"
    return errs[worst]
