"""Model-level helpers: apply_lora's matching (as PEFT), freezing, lora_state_dict, merge / unmerge /
merge_and_unload, model.to(dtype)."""
import copy

import pytest
import torch
from torch import nn

import fastlora
from helpers import BACKENDS, DEVICE, DoubledLinear, Net, TaggedLinear, lora_paths, with_random_B
from hf_tiny import peft_twin, tiny_llama


def test_apply_lora_by_name_shares_weights_and_freezes_the_rest():
    torch.manual_seed(0)
    model = Net()
    ids = torch.randint(0, 24, (2, 5))
    before = model(ids)
    q = model.blocks[0].q_proj
    out = fastlora.apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8, backend="torch")
    assert out is model
    assert lora_paths(model) == ["blocks.0.q_proj", "blocks.0.v_proj", "blocks.1.q_proj", "blocks.1.v_proj"]
    layer = model.blocks[0].q_proj
    assert layer.weight is q.weight and layer.bias is q.bias and layer.scaling == 2.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.{m}.lora_{ab}" for i in (0, 1) for m in ("q_proj", "v_proj")
                         for ab in "AB"}
    torch.testing.assert_close(model(ids), before, rtol=0, atol=0)  # B starts at zero


def test_suffix_match_is_on_whole_path_components_as_peft():
    model = Net()
    with pytest.raises(ValueError, match=r"target_modules name 'proj' matches no module"):
        fastlora.apply_lora(model, ["proj"])  # 'out_proj' does not end with '.proj'
    fastlora.apply_lora(model, ["blocks.1.out_proj", "0.v_proj"])
    assert lora_paths(model) == ["blocks.0.v_proj", "blocks.1.out_proj"]


def test_regex_is_a_full_match_and_exclude_modules_removes():
    model = Net()
    fastlora.apply_lora(model, r"blocks\.\d\.(q|v)_proj", exclude_modules=["blocks.1.v_proj"])
    assert lora_paths(model) == ["blocks.0.q_proj", "blocks.0.v_proj", "blocks.1.q_proj"]
    with pytest.raises(ValueError, match=r"regex 'q_proj' matches no module path"):
        fastlora.apply_lora(Net(), "q_proj")  # a regex must match the whole path
    model = Net()
    fastlora.apply_lora(model, ["q_proj", "v_proj"], exclude_modules=r".*\.1\..*")
    assert lora_paths(model) == ["blocks.0.q_proj", "blocks.0.v_proj"]


def test_all_linear_leaves_the_output_head():
    model = Net()
    fastlora.apply_lora(model, "all-linear")
    assert lora_paths(model) == sorted(f"blocks.{i}.{m}" for i in (0, 1)
                                       for m in ("q_proj", "v_proj", "out_proj"))
    assert type(model.lm_head) is nn.Linear


def test_all_linear_selects_what_peft_selects_on_a_transformers_model():
    base = tiny_llama()
    peft_model = peft_twin(base, "all-linear")
    theirs = sorted(p.removeprefix("base_model.model.") for p, m in peft_model.named_modules()
                    if type(m).__name__ == "Linear" and hasattr(m, "lora_A"))
    ours = lora_paths(fastlora.apply_lora(copy.deepcopy(base), "all-linear"))
    assert ours == theirs and len(ours) == 14 and "lm_head" not in ours


def test_names_that_match_nothing_list_close_names():
    with pytest.raises(ValueError, match=r"target_modules name 'q_prj' matches no module; close names: \['q_proj'"):
        fastlora.apply_lora(Net(), ["q_proj", "q_prj"])
    with pytest.raises(ValueError, match=r"exclude_modules name 'vproj' matches no module; close names: \['v_proj'"):
        fastlora.apply_lora(Net(), ["q_proj"], exclude_modules=["vproj"])
    model = Net()
    with pytest.raises(ValueError, match="matches no module"):
        fastlora.apply_lora(model, ["q_proj", "nothing_like_it"])
    assert lora_paths(model) == []  # nothing was replaced before the error


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match=r"target_modules matched modules that are not nn.Linear: embed \(Embedding\)"):
        fastlora.apply_lora(Net(), ["embed", "q_proj"])
    model = fastlora.apply_lora(Net(), ["q_proj"])
    with pytest.raises(TypeError, match="LoRA is already applied there"):
        fastlora.apply_lora(model, ["q_proj"])
    with pytest.raises(TypeError, match="target_modules must be a list of module names or a regex string, got int"):
        fastlora.apply_lora(Net(), 5)
    with pytest.raises(ValueError, match="target_modules must be a non-empty list"):
        fastlora.apply_lora(Net(), [])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        fastlora.apply_lora(Net(), "q_proj(")
    with pytest.raises(ValueError, match="leaves no module to adapt"):
        fastlora.apply_lora(Net(), ["q_proj"], exclude_modules=["q_proj"])
    with pytest.raises(ValueError, match="exclude_modules cannot be 'all-linear'"):
        fastlora.apply_lora(Net(), ["q_proj"], exclude_modules="all-linear")
    with pytest.raises(TypeError, match="apply_lora: model must be a torch.nn.Module, got dict"):
        fastlora.apply_lora({}, ["q_proj"])
    model = Net()
    model.blocks[0].q_proj.weight = nn.Parameter(torch.zeros(16, 16, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=r"weight is not a plain floating-point tensor \(quantized\?\): "
                                        r"blocks.0.q_proj \(Linear, Parameter of torch.int8\)"):
        fastlora.apply_lora(model, ["q_proj"])
    model = Net()
    with pytest.raises(ValueError, match="r must be a positive int, got 0"):
        fastlora.apply_lora(model, ["q_proj"], r=0)
    assert lora_paths(model) == []


def test_apply_lora_refuses_a_linear_subclass_with_its_own_forward():
    """Replacing it would change the model's output at initialisation."""
    model = Net()
    model.blocks[1].q_proj = DoubledLinear(16, 16)
    model.blocks[0].q_proj = TaggedLinear(16, 16)
    with pytest.raises(TypeError, match=r"apply_lora: target_modules matched nn.Linear subclasses "
                                        r"with a forward of their own.*: blocks.1.q_proj \(DoubledLinear\)"):
        fastlora.apply_lora(model, ["q_proj", "v_proj"])
    assert lora_paths(model) == []
    assert lora_paths(fastlora.apply_lora(model, ["blocks.0.q_proj"])) == ["blocks.0.q_proj"]


def test_apply_lora_on_a_bare_linear_returns_the_new_layer():
    lin = nn.Linear(8, 4)
    layer = fastlora.apply_lora(lin, "all-linear", r=2)
    assert isinstance(layer, fastlora.LoRALinear) and layer.weight is lin.weight
    back = fastlora.merge_and_unload(layer)
    assert type(back) is nn.Linear and back.weight is lin.weight


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_mark_only_lora_as_trainable_and_lora_state_dict(bias):
    model = fastlora.apply_lora(Net(), ["q_proj", "v_proj"])
    fastlora.mark_only_lora_as_trainable(model, bias=bias)
    lora = {f"blocks.{i}.{m}.lora_{ab}" for i in (0, 1) for m in ("q_proj", "v_proj") for ab in "AB"}
    biases = {"none": set(),
              "lora_only": {"blocks.0.q_proj.bias", "blocks.1.q_proj.bias"},  # v_proj has none
              "all": {n for n, _ in model.named_parameters() if n.endswith(".bias")}}[bias]
    assert "blocks.0.norm.bias" in biases or bias != "all"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora | biases
    state = fastlora.lora_state_dict(model, bias=bias)
    assert set(state) == lora | biases
    full = model.state_dict()
    for name, t in state.items():
        assert t.data_ptr() == full[name].data_ptr() and not t.requires_grad
    with pytest.raises(ValueError, match=r"bias must be one of \('none', 'all', 'lora_only'\), got 'some'"):
        fastlora.lora_state_dict(model, bias="some")
    with pytest.raises(ValueError, match="has no LoRA layers; add them with fastlora.apply_lora"):
        fastlora.mark_only_lora_as_trainable(Net())


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_matches_unmerged_and_unmerge_is_bit_exact(backend):
    torch.manual_seed(0)
    model = with_random_B(fastlora.apply_lora(Net().to(DEVICE), "all-linear", r=4, alpha=8,
                                              backend=backend))
    ids = torch.randint(0, 24, (2, 5), device=DEVICE)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    unmerged = model(ids)
    fastlora.merge(model)
    fastlora.merge(model)  # no-op: merging twice must not add the delta twice
    layer = model.blocks[0].q_proj
    assert layer.merged and "merged=True" in repr(layer)
    x = torch.randn(3, 16, device=DEVICE)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    torch.testing.assert_close(model(ids), unmerged, rtol=1e-5, atol=1e-5)
    fastlora.unmerge(model)
    assert not layer.merged
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
    torch.testing.assert_close(model(ids), unmerged, rtol=0, atol=0)


def test_unmerge_is_exact_where_subtracting_the_delta_is_not():
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(64, 64, r=8, alpha=16, init_lora_weights=False, dtype=torch.bfloat16)
    w0 = layer.weight.detach().clone()
    layer.merge()
    delta = (layer.lora_B.float() @ layer.lora_A.float() * layer.scaling).to(torch.bfloat16)
    assert not torch.equal(layer.weight - delta, w0)  # what PEFT's unmerge would restore
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


def test_merge_refuses_a_non_finite_result_and_undoes_the_layers_before():
    model = with_random_B(fastlora.apply_lora(Net(), ["q_proj"], r=2)).half()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.blocks[1].q_proj.lora_B.fill_(6e4)  # fp16 overflows to inf
    with pytest.raises(ValueError,
                       match=r"merge: layer 'blocks.1.q_proj': .*W \+ s B A is not finite in torch.float16"):
        fastlora.merge(model)
    assert not model.blocks[0].q_proj.merged and not model.blocks[1].q_proj.merged
    for n, p in model.named_parameters():
        if "lora" not in n:
            assert torch.equal(p, weights[n]), n


def test_a_state_dict_taken_while_merged_is_the_unmerged_one():
    """A merged model's state dict holds the weight from before the merge: loaded into an unmerged
    model (strict, every key matching) it must not count the adapter twice."""
    torch.manual_seed(0)
    model = with_random_B(fastlora.apply_lora(Net(), ["q_proj", "v_proj"], r=4, alpha=8, backend="torch"))
    ids = torch.randint(0, 24, (2, 5))
    expected, unmerged_state = model(ids), copy.deepcopy(model.state_dict())
    fastlora.merge(model)
    state = model.state_dict()
    assert list(state) == list(unmerged_state)
    assert all(torch.equal(state[k], unmerged_state[k]) for k in state)
    fresh = fastlora.apply_lora(Net(), ["q_proj", "v_proj"], r=4, alpha=8, backend="torch")
    fresh.load_state_dict(state, strict=True)
    torch.testing.assert_close(fresh(ids), expected, rtol=0, atol=0)
    lora = fastlora.lora_state_dict(model)  # A, B: the same merged or not
    assert all(torch.equal(lora[k], unmerged_state[k]) for k in lora)


@pytest.mark.parametrize("what", ["state_dict", "lora_state_dict"])
def test_loading_into_a_merged_model_merges_what_was_loaded(what):
    """Loading adapters into a merged layer must not leave it computing with the old merge (and
    unmerge must still restore the base weight)."""
    torch.manual_seed(0)
    model = with_random_B(fastlora.apply_lora(Net(), ["q_proj", "v_proj"], r=4, alpha=8, backend="torch"), 0)
    other = copy.deepcopy(model)
    with_random_B(other, seed=1)
    ids = torch.randint(0, 24, (2, 5))
    base_weight = model.blocks[0].q_proj.weight.detach().clone()
    fastlora.merge(model)
    state = other.state_dict() if what == "state_dict" else fastlora.lora_state_dict(other)
    model.load_state_dict(state, strict=what == "state_dict")
    assert model.blocks[0].q_proj.merged
    torch.testing.assert_close(model(ids), other(ids), rtol=1e-5, atol=1e-5)
    fastlora.unmerge(model)
    assert torch.equal(model.blocks[0].q_proj.weight, base_weight)
    torch.testing.assert_close(model(ids), other(ids), rtol=0, atol=0)


def tied(model, *pairs):
    """``model`` with each (a, b) pair of module paths sharing a's weight Parameter (tied weights)."""
    for a, b in pairs:
        model.get_submodule(b).weight = model.get_submodule(a).weight
    return model


@pytest.mark.parametrize("how", ["merge", "merge_and_unload"])
@pytest.mark.parametrize("targets,pair,match", [
    (["q_proj"], ("blocks.0.q_proj", "blocks.1.q_proj"),
     r"'blocks.0.q_proj' shares its weight with blocks.1.q_proj.weight"),
    (["lm_head"], ("embed", "lm_head"), r"'lm_head' shares its weight with embed.weight"),
], ids=["two-lora-layers", "lora-layer-and-embedding"])
def test_merge_refuses_tied_weights_before_changing_anything(how, targets, pair, match):
    """Merging writes s B A into the weight in place: with a tied weight, both layers' updates would
    land in the one tensor (and unmerge could not restore it), or the other module would compute
    with this layer's update."""
    torch.manual_seed(0)
    model = with_random_B(fastlora.apply_lora(tied(Net(), pair), targets, r=4, alpha=8, backend="torch"))
    ids = torch.randint(0, 24, (2, 5))
    expected = model(ids)
    weights = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    paths = lora_paths(model)
    with pytest.raises(ValueError, match=rf"{how}: layer {match} \(tied weights\)"):
        getattr(fastlora, how)(model)
    assert lora_paths(model) == paths and not any(m.merged for m in model.modules()
                                                  if isinstance(m, fastlora.LoRALinear))
    for n, p in model.named_parameters(remove_duplicate=False):
        assert torch.equal(p, weights[n]), n
    torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)


def test_a_layer_reached_by_two_paths_is_not_tied():
    """A reused block (one module at two paths) has one LoRA layer, one update: it merges."""
    torch.manual_seed(0)
    model = Net()
    model.blocks[1] = model.blocks[0]
    model = with_random_B(fastlora.apply_lora(model, ["q_proj"], r=4, alpha=8, backend="torch"))
    ids = torch.randint(0, 24, (2, 5))
    w0, expected = model.blocks[0].q_proj.weight.detach().clone(), model(ids)
    fastlora.merge(model)
    torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)
    fastlora.unmerge(model)
    assert torch.equal(model.blocks[1].q_proj.weight, w0)


def test_weights_that_are_slices_of_one_tensor_but_do_not_overlap_merge():
    """Views into one fused tensor (a split qkv, say) share storage but not elements: not tied."""
    torch.manual_seed(0)
    model = Net()
    fused = torch.randn(32, 16)
    model.blocks[0].q_proj.weight = nn.Parameter(fused[:16])
    model.blocks[1].q_proj.weight = nn.Parameter(fused[16:])
    model = with_random_B(fastlora.apply_lora(model, ["q_proj"], r=4, alpha=8, backend="torch"))
    before = fused.clone()
    fastlora.merge(model)
    fastlora.unmerge(model)
    assert torch.equal(fused, before)


def test_merge_and_unload_gives_plain_linears_with_the_same_output():
    torch.manual_seed(0)
    model = with_random_B(fastlora.apply_lora(Net(), ["q_proj", "v_proj"], backend="torch"))
    ids = torch.randint(0, 24, (2, 5))
    expected = model(ids)
    q_weight = model.blocks[0].q_proj.weight
    out = fastlora.merge_and_unload(model)
    assert out is model and lora_paths(model) == []
    q = model.blocks[0].q_proj
    assert type(q) is nn.Linear and q.weight is q_weight and model.blocks[0].v_proj.bias is None
    assert not any(n.startswith("_weight_before_merge") for n, _ in model.named_buffers())
    torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == set(Net().state_dict())


def test_model_to_dtype_converts_the_adapters_and_the_unmerge_copy():
    torch.manual_seed(0)
    model = with_random_B(fastlora.apply_lora(Net(), ["q_proj", "v_proj"], backend="torch"))
    ids = torch.randint(0, 24, (2, 5))
    ref = model(ids).double()
    model.to(torch.float64)
    layer = model.blocks[0].q_proj
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    out = model(ids)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert layer.lora_A.grad.dtype == torch.float64 and layer.weight.grad is None
    w0 = layer.weight.detach().clone()
    fastlora.merge(model)
    model.to(torch.float32)
    fastlora.unmerge(model)
    assert torch.equal(layer.weight, w0.float())
