"""from_peft against real PEFT: same logits, same LoRA gradients, same training run, PEFT's own
Parameters and save_pretrained untouched; unfusable layers keep PEFT's forward and are listed once."""
import copy
import pickle
import warnings

import pytest
import torch

import fastlora
from helpers import BACKENDS, DEVICE
from hf_tiny import (TARGETS, assert_same_as_peft, input_ids, logits_and_lora_grads, lora_key,
                     max_err, peft_twin, randomize_lora_B, require_hf, tiny_llama)
from fastlora import peft_interop

transformers, peft = require_hf()
st = pytest.importorskip("safetensors.torch")


@pytest.fixture
def fused_calls(monkeypatch):
    """How many times the fused path ran: a comparison where it never ran would prove nothing."""
    calls = []
    real = peft_interop.lora_linear

    def counting(*args, **kwargs):
        calls.append(kwargs["backend"])
        return real(*args, **kwargs)

    monkeypatch.setattr(peft_interop, "lora_linear", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_same_logits_and_lora_grads_as_peft(dtype, backend, fused_calls):
    theirs = peft_twin(tiny_llama(dtype))
    ours = fastlora.from_peft(copy.deepcopy(theirs), backend=backend)
    ids = input_ids()
    assert_same_as_peft(logits_and_lora_grads(ours, ids), logits_and_lora_grads(theirs, ids), dtype)
    assert fused_calls == [backend] * 3 * 2  # 3 targets x 2 layers, forward only


def test_parameters_are_shared_and_peft_saving_still_works(tmp_path):
    model = peft_twin(tiny_llama())
    before = dict(model.named_parameters())
    trainable = {n for n, p in before.items() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about on a plain LoRA model
        out = fastlora.from_peft(model)
    assert out is model
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert {n for n, p in after.items() if p.requires_grad} == trainable
    model.save_pretrained(tmp_path / "after")
    peft_twin(tiny_llama()).save_pretrained(tmp_path / "before")  # the same seeds: same tensors
    a = st.load_file(tmp_path / "after" / "adapter_model.safetensors")
    b = st.load_file(tmp_path / "before" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train(model, steps=5, lr=3e-2):
    """A few AdamW steps on a synthetic next-token task (the sequence n, n+1, n+2, ... mod vocab)."""
    torch.manual_seed(0)
    ids = ((torch.arange(12) + torch.randint(0, 128, (4, 1))) % 128).to(DEVICE)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["from_peft", pytest.param("apply_lora + load_adapter", marks=pytest.mark.slow)])
def test_fine_tuning_lowers_the_loss_as_peft_does(tmp_path, backend, how, fused_calls):
    base = tiny_llama()
    theirs = peft_twin(base)
    if how == "from_peft":
        ours = fastlora.from_peft(copy.deepcopy(theirs), backend=backend)
    else:
        theirs.save_pretrained(tmp_path)
        ours = fastlora.apply_lora(copy.deepcopy(base), TARGETS, r=8, alpha=16, backend=backend)
        ours = fastlora.load_adapter(ours, tmp_path)
    expected, got = train(theirs), train(ours)
    assert all(b < a for a, b in zip(expected, expected[1:])) and expected[-1] < expected[0] - 0.2
    rel = max(abs(g - e) / e for g, e in zip(got, expected))
    assert rel <= 1e-6, f"losses {got} vs PEFT {expected}"
    # Adam amplifies fp32 roundings in the gradients a little: measured 2e-6
    theirs_p = {lora_key(n): p for n, p in theirs.named_parameters() if lora_key(n)}
    ours_p = {lora_key(n): p for n, p in ours.named_parameters() if lora_key(n)}
    assert ours_p.keys() == theirs_p.keys()
    worst = max(max_err(ours_p[k], theirs_p[k]) for k in theirs_p)
    assert worst <= 2e-5, f"trained LoRA parameters differ by {worst:.3g}"
    if how == "from_peft":
        assert len(fused_calls) == 6 * 5


def test_model_to_dtype_after_from_peft():
    theirs = peft_twin(tiny_llama())
    ours = fastlora.from_peft(copy.deepcopy(theirs), backend="torch").to(torch.float64)
    theirs.to(torch.float64)
    ids = input_ids()
    assert_same_as_peft(logits_and_lora_grads(ours, ids), logits_and_lora_grads(theirs, ids), torch.float64)


def test_disabled_and_merged_adapters_take_peft_path_and_agree(fused_calls):
    base = tiny_llama()
    theirs = peft_twin(base)
    ours = fastlora.from_peft(copy.deepcopy(theirs), backend="torch")
    ids = input_ids()
    with torch.no_grad():
        for model in (ours, theirs):
            model.merge_adapter()
        merged = ours(input_ids=ids).logits
        torch.testing.assert_close(merged, theirs(input_ids=ids).logits, rtol=0, atol=0)
        for model in (ours, theirs):
            model.unmerge_adapter()
        assert fused_calls == []
        with ours.disable_adapter(), theirs.disable_adapter():
            plain = ours(input_ids=ids).logits
            torch.testing.assert_close(plain, theirs(input_ids=ids).logits, rtol=0, atol=0)
        assert fused_calls == []
        # PEFT's unmerge subtracts the delta again, which is not exact: the base moved by roundings
        torch.testing.assert_close(plain, base(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
        fused = ours(input_ids=ids).logits  # unmerged and enabled again: fused
        assert len(fused_calls) == 6
        torch.testing.assert_close(fused, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused, merged, rtol=1e-4, atol=1e-5)


def test_mixed_precision_fp32_adapters_on_bf16_and_autocast(fused_calls):
    base = tiny_llama()
    ids = input_ids()
    reference = peft_twin(base).to(torch.float64)(input_ids=ids).logits
    theirs = peft_twin(base.to(torch.bfloat16))  # PEFT keeps the adapters in float32
    assert theirs.base_model.model.model.layers[0].self_attn.q_proj.lora_A.default.weight.dtype == torch.float32
    ours = fastlora.from_peft(copy.deepcopy(theirs), backend="torch")
    with torch.no_grad():
        got, expected = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert len(fused_calls) == 6 and got.dtype == torch.bfloat16
    # the LoRA branch runs in bf16 here, in fp32 in PEFT: at most about as wrong as PEFT itself
    assert (got - reference).abs().max() <= 2 * (expected - reference).abs().max()


def test_autocast_training_is_fused_and_as_accurate_as_peft(fused_calls):
    """The common PEFT recipe: float32 model and adapters, bfloat16 autocast. The fused path runs
    (casting as nn.Linear does) and its logits and LoRA gradients are no further from the float64
    model's than PEFT's own under the same autocast."""
    def twin():  # the same PEFT model each call, with a nonzero LoRA branch
        model = peft_twin(tiny_llama())
        randomize_lora_B(model)
        return model

    ids = input_ids()
    reference = logits_and_lora_grads(twin().to(torch.float64), ids)
    theirs = twin()
    ours = fastlora.from_peft(copy.deepcopy(theirs), backend="torch")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got, expected = logits_and_lora_grads(ours, ids), logits_and_lora_grads(theirs, ids)
    assert fused_calls == ["torch"] * 6 and got[0].dtype == torch.bfloat16
    assert set(got[1]) == set(reference[1])
    for name, ref in [("logits", reference[0]), *reference[1].items()]:
        g = got[0] if name == "logits" else got[1][name]
        e = expected[0] if name == "logits" else expected[1][name]
        assert max_err(g, ref) <= 2 * max_err(e, ref), name


def from_peft_warning(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastlora.from_peft(model, backend="torch")
    ours = [w for w in caught if "fastlora.from_peft" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    return str(ours[0].message)


def test_unfusable_layers_keep_peft_forward_listed_in_one_warning(fused_calls):
    theirs = peft_twin(tiny_llama(), ["q_proj"], use_dora=True)
    theirs.add_adapter("plain", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "down_proj"]))
    theirs.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: o_proj has no bias, so this adapter cannot merge
        theirs.add_adapter("biased", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"],
                                                     lora_bias=True))
    theirs.base_model.set_adapter(["default", "plain", "other", "biased"])
    randomize_lora_B(theirs, seed=5)
    ours = copy.deepcopy(theirs)
    message = from_peft_warning(ours)
    assert "4 of 8 LoRA layers keep PEFT's forward" in message
    for i in (0, 1):
        for path, reason in [("mlp.down_proj", "2 active adapters"), ("self_attn.o_proj", "lora_bias")]:
            assert f"base_model.model.model.layers.{i}.{path} ({reason})" in message
    assert "v_proj" not in message  # only 'plain' is active there: fused
    assert "q_proj" not in message  # DoRA: fused (tests/test_dora_peft.py)
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-6)
    assert len(fused_calls) == 4


def test_hooks_on_a_base_layer_keep_peft_forward(fused_calls):
    model = peft_twin(tiny_llama())
    q0 = model.base_model.model.model.layers[0].self_attn.q_proj
    seen = []
    q0.base_layer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    assert "model.layers.0.self_attn.q_proj (its base layer has hooks" in from_peft_warning(model)
    q1 = model.base_model.model.model.layers[1].self_attn.q_proj
    q1.base_layer.register_forward_pre_hook(lambda module, args: seen.append("pre"))  # added later
    with torch.no_grad():
        model(input_ids=input_ids())
    assert len(seen) == 2 and len(fused_calls) == 4  # the hooks ran; the other 4 layers fused


def test_conv1d_base_and_non_linear_layers_are_listed():
    transformers, _ = require_hf()
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2,
                                                                vocab_size=64, n_positions=16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own fan_in_fan_out notice
        theirs = peft_twin(gpt2.eval(), ["c_attn", "wte"])
    message = from_peft_warning(theirs)
    assert "transformer.h.0.attn.c_attn (base layer is Conv1D, not nn.Linear)" in message
    assert "transformer.wte (Embedding: only LoRA Linear layers are fused)" in message


def test_copies_stay_fused_on_their_own_parameters(fused_calls):
    model = fastlora.from_peft(peft_twin(tiny_llama()), backend="torch")
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        layer = clone.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.forward.layer is layer
        with torch.no_grad():
            torch.testing.assert_close(clone(input_ids=input_ids()).logits,
                                       model(input_ids=input_ids()).logits, rtol=0, atol=0)


def test_errors():
    with pytest.raises(ValueError, match="has no PEFT LoRA layers"):
        fastlora.from_peft(tiny_llama())
    with pytest.raises(ValueError,
                       match=r"backend must be one of \('auto', 'triton', 'fused', 'split', 'torch'\), got 'cuda'"):
        fastlora.from_peft(peft_twin(tiny_llama()), backend="cuda")
    with pytest.raises(TypeError, match="from_peft: peft_model must be a torch.nn.Module, got str"):
        fastlora.from_peft("model")
    with pytest.raises(TypeError, match="load_adapter: model is a PEFT model"):
        fastlora.load_adapter(peft_twin(tiny_llama()), ".")

