"""DoRA against real PEFT (``LoraConfig(use_dora=True)``) on a tiny Llama built from a config: logits
and every gradient (A, B and the magnitude) through five optimizer steps, with and without dropout;
adapter files both ways; merging; from_peft fusing DoRA layers and leaving other variants alone."""
import copy
import warnings

import pytest
import torch
from torch import nn

import fastlora
from fastlora import peft_interop
from helpers import BACKENDS, DEVICE, full_suite_only
from hf_tiny import TARGETS, input_ids, max_err, require_hf, tiny_llama

transformers, peft = require_hf()
st = pytest.importorskip("safetensors.torch")

# max |fastlora - peft| / max |peft| per step: the same products in the same dtype, summed in
# another order; AdamW amplifies the roundings of later steps a little.
TOL = {torch.float64: 1e-12, torch.float32: 1e-4}


def dora_twin(base, dropout=0.0, seed=1):
    """PEFT DoRA on a copy of ``base`` (r=8, alpha=16 on TARGETS) with random B and a magnitude off
    ||W + s B A|| by up to 30% a feature, so that every term of DoRA is exercised."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS, use_dora=True))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * (torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1).to(p.device))
    return model


def key(name):
    """(module path, "A" | "B" | "m") for a DoRA parameter of PEFT's or fastlora's."""
    name = name.removeprefix("base_model.model.").replace(".default", "").removesuffix(".weight")
    for suffix, short in ((".lora_A", "A"), (".lora_B", "B"), (".lora_magnitude_vector", "m")):
        if name.endswith(suffix):
            return name[: -len(suffix)], short
    return None


class Masks:
    """The same dropout masks for both models: PEFT's k-th dropout call and fastlora's k-th dropout
    seed (its forward and backward regenerate one mask from one seed) get mask k."""

    def __init__(self, p):
        self.p, self.by_seed, self.calls = p, {}, 0

    def mask(self, k, shape):
        g = torch.Generator().manual_seed(1000 + k)
        return (torch.rand(shape, generator=g) >= self.p).to(DEVICE)

    def for_fastlora(self, dropout, shape, device):
        k = self.by_seed.setdefault(int(dropout.seed.item()), len(self.by_seed))
        return self.mask(k, tuple(shape))

    def peft_dropout(self, module):
        def forward(x):
            self.calls += 1
            keep = self.mask(self.calls - 1, (x.numel() // x.shape[-1], x.shape[-1])).reshape(x.shape)
            return x * keep / (1 - self.p)
        return forward


@pytest.fixture
def same_masks(monkeypatch):
    """Install ``Masks`` for fastlora's routes; returns a function that installs it on a PEFT model."""
    from fastlora import torch_route, triton_routes
    holder = {}

    def install(peft_model, p):
        masks = Masks(p)
        holder["masks"] = masks
        for module in peft_model.modules():
            if isinstance(module, nn.Dropout) and module.p == p:
                module.forward = masks.peft_dropout(module)
        return masks

    def keep_mask(*args):
        dropout, shape, device = args[-3:]
        return holder["masks"].for_fastlora(dropout, shape, device)

    monkeypatch.setattr(torch_route.TorchRoute, "keep_mask", staticmethod(keep_mask))
    for route in (triton_routes.FusedRoute, triton_routes.SplitRoute, triton_routes.ChosenRoute):
        monkeypatch.setattr(route, "keep_mask", lambda self, *a: keep_mask(*a))
    return install


def train_and_compare(theirs, ours, dtype, steps=5, lr=1e-2):
    """Five AdamW steps on the same batches; before each step, logits and every DoRA gradient equal."""
    torch.manual_seed(0)
    batches = [((torch.arange(12) + torch.randint(0, 128, (4, 1))) % 128).to(DEVICE) for _ in range(steps)]
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr) for m in (theirs, ours)]
    worst = 0.0
    for ids in batches:
        results = []
        for model, opt in zip((theirs, ours), opts):
            model.train()
            out = model(input_ids=ids, labels=ids)
            opt.zero_grad()
            out.loss.backward()
            grads = {key(n): p.grad.detach().clone() for n, p in model.named_parameters() if key(n)}
            results.append((out.logits.detach(), grads))
            opt.step()
        (l_theirs, g_theirs), (l_ours, g_ours) = results
        assert g_theirs.keys() == g_ours.keys() and {k[1] for k in g_theirs} == {"A", "B", "m"}
        errs = {"logits": max_err(l_ours, l_theirs), **{k: max_err(g_ours[k], g_theirs[k]) for k in g_theirs}}
        name = max(errs, key=errs.get)
        assert errs[name] <= TOL[dtype], f"{name} differs by {errs[name]:.3g}"
        worst = max(worst, errs[name])
    return worst


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    real = peft_interop.lora_linear

    def counting(*args, **kwargs):
        calls.append(kwargs["magnitude"] is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(peft_interop, "lora_linear", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, pytest.param(torch.float32, marks=pytest.mark.slow)],
                         ids=["fp64", "fp32"])
@pytest.mark.parametrize("backend", full_suite_only(BACKENDS, inner={"torch"}))
@pytest.mark.parametrize("dropout", [0.0, pytest.param(0.2, marks=pytest.mark.slow)], ids=["nodrop", "drop0.2"])
@pytest.mark.parametrize("how", ["from_peft", pytest.param("apply_lora + load_adapter", marks=pytest.mark.slow)])
def test_five_training_steps_match_peft_dora(dtype, backend, dropout, how, tmp_path, same_masks, fused_calls):
    base = tiny_llama(dtype)
    theirs = dora_twin(base, dropout)
    if how == "from_peft":
        ours = fastlora.from_peft(copy.deepcopy(theirs), backend=backend)
    else:
        theirs.save_pretrained(tmp_path)
        ours = fastlora.apply_lora(copy.deepcopy(base), TARGETS, r=8, alpha=16, dropout=dropout,
                                   use_dora=True, backend=backend)
        ours = fastlora.load_adapter(ours, tmp_path)
    masks = same_masks(theirs, dropout) if dropout else None
    train_and_compare(theirs, ours, dtype)
    if how == "from_peft":
        assert fused_calls == [True] * 6 * 5  # 3 targets x 2 layers, every step, all DoRA
    if dropout:
        assert masks.calls == 6 * 5 and len(masks.by_seed) == 6 * 5  # the masks really ran


def test_eval_mode_drops_nothing_as_peft(same_masks):
    """PEFT's DoRA applies dropout only while the layer trains, whatever the dropout module says."""
    theirs = dora_twin(tiny_llama(torch.float64), dropout=0.3)
    ours = fastlora.from_peft(copy.deepcopy(theirs), backend="torch")
    ids = input_ids()
    with torch.no_grad():
        for model in (theirs, ours):
            model.eval()
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.train()  # the dropout module trains, the layer does not
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_adapter_files_round_trip_peft_and_fastlora(dtype, tmp_path):
    base = tiny_llama(dtype)
    theirs = dora_twin(base)
    theirs.save_pretrained(tmp_path / "peft")
    ours = fastlora.load_adapter(copy.deepcopy(base), tmp_path / "peft")  # layers made from the config
    assert all(m.use_dora for m in ours.modules() if isinstance(m, fastlora.LoRALinear))
    ids = input_ids()
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        assert max_err(ours(input_ids=ids).logits, want) <= TOL[dtype]
    fastlora.save_adapter(ours, tmp_path / "ours")
    a = st.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    b = st.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(k.endswith(".lora_magnitude_vector") for k in b) == 6
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert back.peft_config["default"].use_dora
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, want, rtol=0, atol=0)


def test_a_dora_adapter_needs_dora_layers_and_a_lora_adapter_lora_layers(tmp_path):
    base = tiny_llama()
    dora_twin(base).save_pretrained(tmp_path / "dora")
    plain = fastlora.apply_lora(copy.deepcopy(base), TARGETS, r=8, alpha=16)
    with pytest.raises(ValueError, match="has use_dora=False but the adapter was trained with use_dora=True"):
        fastlora.load_adapter(plain, tmp_path / "dora")
    fastlora.save_adapter(plain, tmp_path / "lora")
    with_dora = fastlora.apply_lora(copy.deepcopy(base), TARGETS, r=8, alpha=16, use_dora=True)
    with pytest.raises(ValueError, match="has use_dora=True but the adapter was trained with use_dora=False"):
        fastlora.load_adapter(with_dora, tmp_path / "lora")
    mixed = fastlora.apply_lora(copy.deepcopy(base), ["q_proj"], r=8, alpha=16, use_dora=True)
    fastlora.apply_lora(mixed, ["v_proj"], r=8, alpha=16)
    with pytest.raises(ValueError, match=r"the LoRA layers differ in use_dora \(\[False, True\]\)"):
        fastlora.save_adapter(mixed, tmp_path / "mixed")


def test_merged_weights_equal_peft_merge(tmp_path):
    base = tiny_llama(torch.float64)
    theirs = dora_twin(base)
    ours = fastlora.from_peft(copy.deepcopy(theirs), backend="torch")
    theirs.save_pretrained(tmp_path)
    mine = fastlora.load_adapter(copy.deepcopy(base), tmp_path)
    ids = input_ids()
    with torch.no_grad():
        unmerged = ours(input_ids=ids).logits
        theirs.merge_adapter()
        fastlora.merge(mine)
        merged = mine(input_ids=ids).logits
        torch.testing.assert_close(merged, theirs(input_ids=ids).logits, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(merged, unmerged, rtol=1e-10, atol=1e-10)
        w_theirs = theirs.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
        torch.testing.assert_close(mine.model.layers[0].self_attn.q_proj.weight, w_theirs, rtol=1e-12, atol=1e-12)


def test_from_peft_fuses_dora_without_a_warning_and_leaves_other_variants(fused_calls):
    theirs = dora_twin(tiny_llama())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = fastlora.from_peft(copy.deepcopy(theirs), backend="torch")
    with torch.no_grad():
        ours(input_ids=input_ids())
    assert fused_calls == [True] * 6
    fused_calls.clear()
    mica = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                             init_lora_weights="mica"))
    with pytest.warns(UserWarning, match=r"q_proj \(MiCALinearVariant\)"):
        fastlora.from_peft(mica, backend="torch")
    with torch.no_grad():
        mica(input_ids=input_ids())
    assert fused_calls == []


def test_dora_layers_lora_linear_refuses_keep_peft_forward():
    """A DoRA layer whose rank passes its size, or whose base weight trains, is PEFT's to compute
    (lora_linear refuses both): listed in from_peft's warning, and the model still runs."""
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=80, lora_alpha=16, target_modules=["q_proj"],
                                                                       use_dora=True))
    with pytest.warns(UserWarning, match=r"q_proj \(DoRA with r=80 > min\(in_features, out_features\)=64\)"):
        ours = fastlora.from_peft(copy.deepcopy(theirs), backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=input_ids()).logits, theirs(input_ids=input_ids()).logits)
    trainable = dora_twin(base)
    trainable.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"layers.0.self_attn.q_proj \(DoRA with a trainable base weight\)"):
        fastlora.from_peft(trainable, backend="torch")
    trainable(input_ids=input_ids()).logits.sum().backward()
