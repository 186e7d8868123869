"""save_adapter / load_adapter: PEFT's file layout both ways, and every malformed adapter refused
with a message naming the file and the first offending tensor."""
import copy
import json
import os
import pathlib
import pickle

import pytest
import torch

import fastlora
from helpers import BACKENDS, Net, lora_paths, with_random_B
from hf_tiny import (TARGETS, assert_same_as_peft, input_ids, logits_and_lora_grads, peft_twin,
                     require_hf, tiny_llama)

st = pytest.importorskip("safetensors.torch")


def adapted(seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    return with_random_B(fastlora.apply_lora(Net(), r=4, alpha=8, **kwargs), seed)


def saved(tmp_path, model=None, **kwargs):
    model = adapted() if model is None else model
    fastlora.save_adapter(model, tmp_path, **kwargs)
    return model


def tensors(directory):
    return st.load_file(os.path.join(directory, "adapter_model.safetensors"))


def rewrite(directory, state):
    st.save_file(state, os.path.join(directory, "adapter_model.safetensors"))


def test_files_have_peft_keys_and_config(tmp_path):
    model = saved(tmp_path)
    keys = set(tensors(tmp_path))
    assert keys == {f"base_model.model.blocks.{i}.{m}.lora_{ab}.weight" for i in (0, 1)
                    for m in ("q_proj", "v_proj") for ab in "AB"}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == lora_paths(model)
    assert (config["lora_dropout"], config["use_rslora"], config["bias"]) == (0.0, False, "none")
    assert config["rank_pattern"] == {} and config["base_model_name_or_path"] is None
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("into", ["fresh model", "apply_lora model"])
def test_round_trip_restores_every_adapter_tensor(tmp_path, into):
    model = saved(tmp_path)
    base = Net()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if "lora" not in k})
    if into == "apply_lora model":
        base = fastlora.apply_lora(base, ["q_proj", "v_proj"], r=4, alpha=8)
    loaded = fastlora.load_adapter(base, tmp_path, backend="torch")
    assert lora_paths(loaded) == lora_paths(model)
    for name, t in fastlora.lora_state_dict(model).items():
        assert torch.equal(loaded.state_dict()[name], t), name
    ids = torch.randint(0, 24, (2, 5))
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == set(fastlora.lora_state_dict(model))


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_biases_are_saved_under_peft_names(tmp_path, bias):
    model = adapted()
    base = Net()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if "lora" not in k})
    with torch.no_grad():
        model.blocks[0].q_proj.bias.add_(1.0)  # trained biases: must come back from the file
        model.blocks[0].out_proj.bias.add_(1.0)
    saved(tmp_path, model, bias=bias)
    keys = set(tensors(tmp_path))
    assert "base_model.model.blocks.0.q_proj.base_layer.bias" in keys  # a LoRA layer's bias
    assert ("base_model.model.blocks.0.out_proj.bias" in keys) == (bias == "all")
    loaded = fastlora.load_adapter(base, tmp_path)
    assert torch.equal(loaded.blocks[0].q_proj.bias, model.blocks[0].q_proj.bias)
    assert torch.equal(loaded.blocks[0].out_proj.bias, model.blocks[0].out_proj.bias) == (bias == "all")


def test_layers_with_different_ranks_use_rank_pattern(tmp_path):
    model = fastlora.apply_lora(Net(), ["q_proj"], r=4, alpha=8)
    model = with_random_B(fastlora.apply_lora(model, ["blocks.1.v_proj"], r=2, alpha=3))
    fastlora.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {r"^blocks\.1\.v_proj": 2}
    assert config["alpha_pattern"] == {r"^blocks\.1\.v_proj": 3}
    base = Net()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if "lora" not in k})
    loaded = fastlora.load_adapter(base, tmp_path)
    assert (loaded.blocks[1].v_proj.r, loaded.blocks[1].v_proj.scaling) == (2, 1.5)
    assert loaded.blocks[0].q_proj.r == 4
    ids = torch.randint(0, 24, (2, 5))
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_an_interrupted_save_leaves_the_old_adapter_whole(tmp_path, monkeypatch):
    saved(tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}

    def dies_half_way(state, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        fastlora.save_adapter(adapted(seed=1), tmp_path)
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before  # no temp file left


def files(directory):
    return {f: (directory / f).read_bytes() for f in sorted(os.listdir(directory))}


def alpha16(seed=1):
    """An adapter whose scaling (4) differs from adapted()'s (2): mixing its files with adapted()'s
    would compute something neither trained."""
    torch.manual_seed(seed)
    return with_random_B(fastlora.apply_lora(Net(), ["q_proj", "v_proj"], r=4, alpha=16), seed)


def test_a_config_that_cannot_be_written_is_refused_before_any_file_changes(tmp_path):
    saved(tmp_path)
    before = files(tmp_path)
    with pytest.raises(TypeError, match="save_adapter: base_model_name_or_path must be a str, a path "
                                        "or None, got object"):
        fastlora.save_adapter(alpha16(), tmp_path, base_model_name_or_path=object())
    assert files(tmp_path) == before
    fastlora.save_adapter(alpha16(), tmp_path, base_model_name_or_path=pathlib.Path("models/llama"))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "models/llama"


def test_a_config_write_that_fails_leaves_the_old_adapter_whole(tmp_path, monkeypatch):
    """A full disk while the config is written: nothing replaced, no temporary file left."""
    saved(tmp_path)
    before = files(tmp_path)
    real_open = open

    def disk_full(file, mode="r", *args, **kwargs):
        if "adapter_config.json" in os.fspath(file) and "w" in mode:
            raise OSError(28, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", disk_full)
    with pytest.raises(OSError, match="No space left"):
        fastlora.save_adapter(alpha16(), tmp_path)
    monkeypatch.undo()
    assert files(tmp_path) == before


def test_files_from_two_different_saves_are_refused_at_load(tmp_path, monkeypatch):
    """A save that dies between replacing the weights and replacing the config (the directory made
    read-only, a crash) leaves new weights beside the old config: load_adapter must refuse the pair,
    not load it with the old config's scaling."""
    saved(tmp_path)
    real_replace = os.replace

    def read_only_after_first(src, dst):
        if os.fspath(dst).endswith("adapter_config.json"):
            raise PermissionError(13, "Read-only file system")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", read_only_after_first)
    with pytest.raises(PermissionError):
        fastlora.save_adapter(alpha16(), tmp_path)
    monkeypatch.undo()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    with pytest.raises(ValueError, match=r"adapter_model.safetensors' was saved with another "
                                         r"adapter_config.json than the one beside it"):
        fastlora.load_adapter(Net(), tmp_path)


def test_a_hand_edited_description_still_loads(tmp_path):
    """The pair check covers the fields that decide what the tensors compute, not descriptive ones
    such as base_model_name_or_path, which people fix by hand."""
    model = saved(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": "elsewhere/llama",
                                       "inference_mode": False}))
    ids = torch.randint(0, 24, (2, 5))
    base = Net()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if "lora" not in k})
    loaded = fastlora.load_adapter(base, tmp_path)
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    config_file.write_text(json.dumps({**config, "lora_alpha": 16}))
    with pytest.raises(ValueError, match="was saved with another adapter_config.json"):
        fastlora.load_adapter(Net(), tmp_path)


def test_a_truncated_file_is_refused_naming_it(tmp_path):
    saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"cannot read '.*adapter_model.safetensors' as safetensors \(truncated"):
        fastlora.load_adapter(Net(), tmp_path)


def test_a_pickle_is_never_loaded(tmp_path):
    saved(tmp_path)

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    payload = pickle.dumps({"x": RunsCode()})
    (tmp_path / "adapter_model.safetensors").write_bytes(payload)
    with pytest.raises(ValueError, match="cannot read .* as safetensors"):
        fastlora.load_adapter(Net(), tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter_model.bin").write_bytes(payload)
    with pytest.raises(ValueError, match="found adapter_model.bin, a pickle, which is refused"):
        fastlora.load_adapter(Net(), tmp_path)
    assert not (tmp_path / "pwned").exists()


def refused(tmp_path, edit, error, match, model=None):
    """Apply ``edit`` to the saved state, load into ``model``: ``error`` matching ``match``, and the
    model untouched."""
    saved(tmp_path)
    state = tensors(tmp_path)
    edit(state)
    rewrite(tmp_path, state)
    model = Net() if model is None else model
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        fastlora.load_adapter(model, tmp_path)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_a_shape_mismatch_is_refused_naming_the_tensor(tmp_path):
    key = "base_model.model.blocks.1.v_proj.lora_B.weight"
    refused(tmp_path, lambda s: s.update({key: torch.zeros(8, 3)}), ValueError,
            rf"'{key}' has shape \(8, 3\) in .* but 'blocks.1.v_proj.lora_B' in the model is \(8, 4\)")


def test_a_dtype_mismatch_is_refused_naming_the_tensor(tmp_path):
    key = "base_model.model.blocks.0.q_proj.lora_A.weight"
    refused(tmp_path, lambda s: s.update({key: s[key].double()}), TypeError,
            rf"'{key}' is torch.float64 in .* but 'blocks.0.q_proj.lora_A' in the model is torch.float32")


def test_unknown_and_missing_keys_are_errors(tmp_path):
    refused(tmp_path, lambda s: s.update({"base_model.model.blocks.0.extra.weight": torch.zeros(1)}),
            ValueError,
            r"holds 1 tensor\(s\) the model has no place for, first 'base_model.model.blocks.0.extra.weight'")
    refused(tmp_path, lambda s: s.pop("base_model.model.blocks.0.v_proj.lora_A.weight"),
            ValueError,
            r"lacks 1 tensor\(s\) the model needs, first 'base_model.model.blocks.0.v_proj.lora_A.weight'")
    # the model's own LoRA layers must all be covered too
    model = fastlora.apply_lora(Net(), ["q_proj", "v_proj", "out_proj"], r=4, alpha=8)
    refused(tmp_path, lambda s: None, ValueError,
            "lacks 4 tensor.*first 'base_model.model.blocks.0.out_proj.lora_A.weight'", model=model)


def test_a_different_scaling_is_refused(tmp_path):
    saved(tmp_path)
    model = fastlora.apply_lora(Net(), ["q_proj", "v_proj"], r=4, alpha=16)
    with pytest.raises(ValueError, match=r"layer 'blocks.0.q_proj' has r=4, alpha=16, use_rslora=False "
                                         r"\(scaling 4\) but the adapter was trained with r=4, lora_alpha=8"):
        fastlora.load_adapter(model, tmp_path)


def test_bad_configs_and_states_are_refused(tmp_path):
    model = saved(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    good = json.loads(config_file.read_text())
    for change, match in [({"peft_type": "IA3"}, "peft_type must be 'LORA', got 'IA3'"),
                          ({"lora_bias": True}, "uses PEFT features fastlora does not implement: lora_bias"),
                          ({"use_dora": "yes"}, "use_dora must be true or false, got 'yes'"),
                          ({"r": 0}, "r must be a positive int, got 0"),
                          ({"bias": "some"}, "bias must be one of"),
                          ({"target_modules": None}, "target_modules must be a regex string or a list")]:
        config_file.write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=match):
            fastlora.load_adapter(Net(), tmp_path)
    config_file.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read .*adapter_config.json' as JSON"):
        fastlora.load_adapter(Net(), tmp_path)
    config_file.write_text(json.dumps(good))
    fastlora.merge(model)
    with pytest.raises(ValueError, match="layer 'blocks.0.q_proj' is merged; unmerge the model"):
        fastlora.load_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="is not a directory"):
        fastlora.load_adapter(Net(), tmp_path / "adapter_config.json")
    with pytest.raises(ValueError, match="has no LoRA layers"):
        fastlora.save_adapter(Net(), tmp_path)
    with pytest.raises(ValueError, match="exists and is not a directory"):
        fastlora.save_adapter(model, tmp_path / "adapter_config.json")


@pytest.mark.parametrize("change,match", [
    ({"rank_pattern": {"q_proj(": 2}}, r"rank_pattern key 'q_proj\(' is not a valid regular expression"),
    ({"alpha_pattern": {"[v": 2}}, r"alpha_pattern key '\[v' is not a valid regular expression"),
    ({"rank_pattern": {"q_proj": "2"}}, r"rank_pattern\['q_proj'\] must be a positive int, got '2'"),
    ({"rank_pattern": {"q_proj": 2.0}}, r"rank_pattern\['q_proj'\] must be a positive int, got 2.0"),
    ({"rank_pattern": {"q_proj": True}}, r"rank_pattern\['q_proj'\] must be a positive int, got True"),
    ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive int, got 0"),
    ({"alpha_pattern": {"q_proj": "8"}}, r"alpha_pattern\['q_proj'\] must be a finite number, got '8'"),
    ({"alpha_pattern": {"q_proj": 10 ** 400}}, r"alpha_pattern\['q_proj'\] must be a finite number, got 1000"),
    ({"lora_alpha": 10 ** 400}, r"lora_alpha must be a finite number, got 1000"),
    ({"lora_alpha": "8"}, r"lora_alpha must be a finite number, got '8'"),
    ({"rank_pattern": ["q_proj"]}, r"rank_pattern must be an object"),
], ids=["rank-regex", "alpha-regex", "rank-str", "rank-float", "rank-bool", "rank-0", "alpha-str",
        "alpha-overflow", "lora_alpha-overflow", "lora_alpha-str", "rank-list"])
@pytest.mark.parametrize("into", ["fresh model", "apply_lora model"])
def test_a_bad_pattern_or_number_in_the_config_names_the_field(tmp_path, change, match, into):
    saved(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    model = Net() if into == "fresh model" else fastlora.apply_lora(Net(), ["q_proj", "v_proj"], r=4, alpha=8)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        fastlora.load_adapter(model, tmp_path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_huge_rank_with_rslora_is_a_scaling_mismatch_not_an_overflow(tmp_path):
    saved(tmp_path)
    rewrite(tmp_path, tensors(tmp_path))  # no fingerprint, as PEFT writes it
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "r": 10 ** 400, "use_rslora": True}))
    model = fastlora.apply_lora(Net(), ["q_proj", "v_proj"], r=4, alpha=8, use_rslora=True)
    with pytest.raises(ValueError,
                       match=r"layer 'blocks.0.q_proj' has r=4, .* but the adapter was trained with r=1000"):
        fastlora.load_adapter(model, tmp_path)


def test_deeply_nested_json_is_a_value_error(tmp_path):
    saved(tmp_path)
    depth = 100_000
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "x": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(ValueError, match="cannot read .*adapter_config.json' as JSON: nested too deeply"):
        fastlora.load_adapter(Net(), tmp_path)


# ---------------------------------------------------------------------------------------------
# Against real PEFT


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["load creates layers", "apply_lora then load"])
def test_peft_saves_fastlora_loads_same_logits_and_grads(tmp_path, dtype, backend, how):
    base = tiny_llama(dtype)
    theirs = peft_twin(base)
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    if how == "apply_lora then load":
        ours = fastlora.apply_lora(ours, TARGETS, r=8, alpha=16, backend=backend)
    ours = fastlora.load_adapter(ours, tmp_path, backend=backend)
    ids = input_ids()
    assert_same_as_peft(logits_and_lora_grads(ours, ids), logits_and_lora_grads(theirs, ids), dtype, how)


@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_fastlora_saves_peft_loads_same_logits(tmp_path, bias):
    _, peft = require_hf()
    base = tiny_llama(attention_bias=True)
    ours = fastlora.apply_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=8, alpha=16, backend="torch")
    ours = with_random_B(fastlora.apply_lora(ours, ["down_proj"], r=4, alpha=4, backend="torch"))
    with torch.no_grad():
        ours.model.layers[0].self_attn.q_proj.bias.add_(0.5)  # a trained bias, saved with lora_only
    fastlora.save_adapter(ours, tmp_path, bias=bias)
    if bias == "none":
        with torch.no_grad():
            ours.model.layers[0].self_attn.q_proj.bias.sub_(0.5)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert theirs.base_model.model.model.layers[1].mlp.down_proj.r["default"] == 4
    ids = input_ids()
    expected = ours(input_ids=ids).logits
    torch.testing.assert_close(theirs(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)


def test_peft_bias_all_adapter_loads(tmp_path):
    base = tiny_llama(attention_bias=True)
    theirs = peft_twin(base, ["q_proj", "o_proj"], bias="all")
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith(".bias"):
                p.add_(0.25)
    theirs.save_pretrained(tmp_path)
    assert any(k.endswith("k_proj.bias") for k in tensors(tmp_path))  # not a LoRA layer's bias
    ours = fastlora.load_adapter(copy.deepcopy(base), tmp_path, backend="torch")
    ids = input_ids()
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits,
                               rtol=1e-5, atol=1e-6)
