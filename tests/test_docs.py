"""The code in README.md and docs/ runs and prints what the text next to it shows."""
import contextlib
import io
import pathlib
import re
import tempfile

from hf_tiny import require_hf

ROOT = pathlib.Path(__file__).resolve().parents[1]


def fenced_blocks(path, heading, lang):
    """The bodies of the ```lang fences (lang "" for a bare fence) in the markdown section under
    ``heading``, up to the next heading of the same or a higher level, in order."""
    level = len(heading.split()[0])
    blocks, in_section, fence, body = [], False, None, []
    for line in (ROOT / path).read_text().splitlines(keepends=True):
        if line.startswith("```"):
            if fence is None:
                fence, body = line[3:].strip(), []
            else:
                if in_section and fence == lang:
                    blocks.append("".join(body))
                fence = None
        elif fence is not None:
            body.append(line)
        elif line.rstrip("\n") == heading:
            in_section = True
        elif in_section and re.match(rf"#{{1,{level}}} ", line):
            break
    return blocks


def run_block(code, tmp_path, monkeypatch):
    """exec ``code`` as a script in tmp_path (its working directory and tempfile's); returns its
    stdout and its globals."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    out, namespace = io.StringIO(), {"__name__": "__main__"}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<markdown>", "exec"), namespace)  # noqa: S102 (the project's own docs)
    return out.getvalue(), namespace


NUMBER = re.compile(r"-?\d+\.\d+(?:e-?\d+)?")


def assert_prints_what_is_shown(printed, shown, loss_atol=2e-3):
    """Line by line equal, except that the numbers of loss lines may differ by ``loss_atol``
    (float32 training on another CPU's BLAS)."""
    got, want = printed.strip().splitlines(), shown.strip().splitlines()
    assert len(got) == len(want), f"printed:\n{printed}\nshown:\n{shown}"
    for g, w in zip(got, want):
        if "loss" in w:
            assert NUMBER.sub("#", g) == NUMBER.sub("#", w), (g, w)
            for a, b in zip(NUMBER.findall(g), NUMBER.findall(w)):
                assert abs(float(a) - float(b)) <= loss_atol, (g, w)
        else:
            assert g == w, f"printed {g!r}, the text shows {w!r}"


def test_readme_hugging_face_example_prints_what_the_readme_shows(tmp_path, monkeypatch):
    require_hf()
    heading = "## Use it on a Hugging Face model"
    (code,), shown = fenced_blocks("README.md", heading, "python"), fenced_blocks("README.md", heading, "")
    assert fenced_blocks("docs/huggingface.md", "# Use it on a Hugging Face model", "python")[0] == code
    assert_prints_what_is_shown(run_block(code, tmp_path, monkeypatch)[0], shown[0])


def test_dora_example_prints_what_docs_dora_shows(tmp_path, monkeypatch):
    heading = "## Use it"
    (code,), (shown,) = fenced_blocks("docs/dora.md", heading, "python"), fenced_blocks("docs/dora.md", heading, "")
    assert_prints_what_is_shown(run_block(code, tmp_path, monkeypatch)[0], shown)


def test_the_trainer_recipe_saves_adapters_that_load_and_resumes_exactly(tmp_path, monkeypatch):
    """docs/huggingface.md's recipe for an apply_lora model in a real transformers.Trainer: a few
    steps on the CPU, adapters in every checkpoint and at the end, loadable by fastlora and PEFT."""
    transformers, peft = require_hf()
    import torch

    import fastlora

    (code,) = fenced_blocks("docs/huggingface.md", "## Training with the Hugging Face Trainer or TRL", "python")
    _, ns = run_block(code, tmp_path, monkeypatch)
    model, trainer = ns["model"], ns["trainer"]
    model.eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        trained = model(input_ids=ids).logits

    def fresh_base():  # the example's base, rebuilt from its seed
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(ns["base"].config).eval()

    with torch.no_grad():
        untrained = fresh_base()(input_ids=ids).logits
        assert (trained - untrained).abs().max() > 1e-3  # training changed the model
        ours = fastlora.load_adapter(fresh_base(), tmp_path / "run" / "adapter")(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(fresh_base(), tmp_path / "run" / "adapter")(input_ids=ids).logits
    torch.testing.assert_close(ours, trained, rtol=0, atol=0)
    torch.testing.assert_close(theirs, trained, rtol=1e-5, atol=1e-5)
    for step in (2, 4):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "adapter_config.json").is_file()
    final = fastlora.load_adapter(fresh_base(), tmp_path / "run" / "checkpoint-4")
    for name, t in fastlora.lora_state_dict(model).items():
        assert torch.equal(final.state_dict()[name], t), name

    # resuming from the Trainer's own checkpoint ends where the uninterrupted run ended
    torch.manual_seed(0)
    again = fastlora.apply_lora(transformers.LlamaForCausalLM(ns["base"].config),
                                target_modules=["q_proj", "v_proj"], r=16, alpha=32)
    ns["Trainer"](model=again, args=ns["args"], train_dataset=ns["train"]).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    resumed = fastlora.lora_state_dict(again)
    assert all(torch.equal(resumed[k], t) for k, t in fastlora.lora_state_dict(model).items())

    # why the recipe: from_pretrained of save_model's output loads the base and drops the LoRA keys
    trainer.save_model(str(tmp_path / "full"))
    with torch.no_grad():
        reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "full").eval()(input_ids=ids).logits
    torch.testing.assert_close(reloaded, untrained, rtol=0, atol=0)


def test_qlora_example_prints_what_docs_qlora_shows(tmp_path, monkeypatch):
    heading = "## A 4-bit layer, trained"
    (code,), (shown,) = fenced_blocks("docs/qlora.md", heading, "python"), fenced_blocks("docs/qlora.md", heading, "")
    assert_prints_what_is_shown(run_block(code, tmp_path, monkeypatch)[0], shown)


def test_the_gpu_check_fits_its_device_call_and_names_what_exists():
    """benchmarks/gpu_check.sh, runnable at every commit: shell syntax, step timeouts that add up
    to the 8 minutes of one device call, and every script and test file it runs present."""
    import subprocess
    script = ROOT / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert sum(int(t) for t in re.findall(r"^timeout (\d+) ", text, re.M)) <= 480
    for path in re.findall(r"\b((?:benchmarks|tests)/[\w/]+\.py)\b", text):
        assert (ROOT / path).is_file(), path
