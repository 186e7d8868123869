"""The command line: argument handling, --json/--csv content, exit codes (CPU)."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import HAS_TRITON
from fastlora import cli
from fastlora.checks import Result


def test_bench_writes_json_and_csv(tmp_path, capsys):
    js, cs = tmp_path / "b.json", tmp_path / "b.csv"
    rc = cli.main(["bench", "--shape", "64,32,48", "--rank", "4", "--mode", "fwd", "full", "--rounds", "2",
                   "--providers", "base", "reference", "fastlora", "--quiet", "--device", "cpu",
                   "--json", str(js), "--csv", str(cs)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "fastlora bench" in out and "torch" in out
    data = json.loads(js.read_text())
    assert {"machine", "torch", "triton", "commit", "date"} <= set(data["environment"])
    rows = data["rows"]
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, m) for p in ("base", "reference", "fastlora")
                                                         for m in ("fwd", "full")}
    for r in rows:
        assert r["status"] == "ok" and r["ms"] > 0 and r["max_rel_err"] < 1e-4
        assert (r["M"], r["in_features"], r["out_features"], r["rank"]) == (64, 32, 48, 4)
        assert r["mem_over_base_mb"] is None  # CPU: unmeasured, not zero
    assert all(r["ratio_to_base"] == 1.0 for r in rows if r["provider"] == "base")
    with open(cs) as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_bench_reports_a_wrong_provider_instead_of_timing_it(monkeypatch, tmp_path):
    from fastlora import bench

    real_build = bench.build

    def broken(provider, w):
        module, params = real_build(provider, w)
        if provider == "fastlora":
            module.scaling *= 1.01  # a 1% error in the low-rank term
        return module, params

    monkeypatch.setattr(bench, "build", broken)
    js = tmp_path / "b.json"
    rc = cli.main(["bench", "--shape", "64,32,48", "--mode", "fwd", "--rounds", "2", "--quiet",
                   "--providers", "base", "fastlora", "--device", "cpu", "--json", str(js)])
    assert rc == 1
    row = next(r for r in json.loads(js.read_text())["rows"] if r["provider"] == "fastlora")
    assert row["status"] == "wrong" and row["ms"] is None


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
BAD_ARGS = [
    (["bench", "--shape", "a,b,c"],
     "fastlora bench: error: argument --shape: expected M,IN,OUT (three positive ints), got 'a,b,c'"),
    (["bench", "--shape", "64,32"], "argument --shape: expected M,IN,OUT (three positive ints), got '64,32'"),
    (["bench", "--shape", "0,32,32"], "argument --shape: expected M,IN,OUT"),
    (["bench", "--rounds", "0"], "fastlora bench: error: argument --rounds: must be a positive int, got '0'"),
    (["bench", "--rank", "0"], "argument --rank: must be a positive int, got '0'"),
    (["bench", "--rank", "16", "x"], "argument --rank: must be a positive int, got 'x'"),
    (["bench", "--M", "-4"], "argument --M: must be a positive int, got '-4'"),
    (["bench", "--dropout", "1.5"], "argument --dropout: must be in [0, 1), got '1.5'"),
    (["bench", "--dropout", "nan"], "argument --dropout: must be in [0, 1), got 'nan'"),
    (["bench", "--M", "16", "--shape", "16,32,32"], "argument --shape: not allowed with argument --M"),
    (["bench", "--device", "tpu"], "argument --device: unknown device 'tpu'; expected cpu, cuda or cuda:N"),
    (["bench", "--device", "meta"], "argument --device: expected cpu, cuda or cuda:N, got 'meta'"),
    (["bench", "--json", "/no/such/dir/b.json"], "argument --json: directory '/no/such/dir' does not exist"),
    (["bench", "--csv", "/no/such/dir/b.csv"], "argument --csv: directory '/no/such/dir' does not exist"),
    (["bench", "--plot", "/no/such/dir/b.png"], "argument --plot: directory '/no/such/dir' does not exist"),
    (["demo", "--steps", "-1"], "fastlora demo: error: argument --steps: must be a positive int, got '-1'"),
    (["--steps", "0"], "fastlora demo: error: argument --steps: must be a positive int, got '0'"),
    (["check", "--device", "cpu:x"], "fastlora check: error: argument --device: unknown device 'cpu:x'"),
    pytest.param(["bench", "--device", "cuda"], "argument --device: 'cuda': CUDA is not available here",
                 marks=NO_CUDA),
    pytest.param(["demo", "--device", "cuda:0"], "argument --device: 'cuda:0': CUDA is not available here",
                 marks=NO_CUDA),
]


@pytest.mark.parametrize("argv,msg", BAD_ARGS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_a_bad_argument_is_a_one_line_error_and_exit_2_before_any_work(argv, msg, capsys, monkeypatch):
    def work(args):
        raise AssertionError("the command started before its arguments were checked")

    for command in ("demo", "bench", "check"):
        monkeypatch.setattr(cli, command, work)
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and msg in err, err


@pytest.mark.slow  # a fresh interpreter (~1.5 s of imports)
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_check_with_triton_on_cpu_without_the_interpreter_prints_the_whole_hint():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "fastlora", "check", "--device", "cpu", "--backend", "triton"],
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 2 and out.stdout == "", out.stdout + out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    assert ("fastlora check: error: lora_linear: backend='triton' needs CUDA tensors, got x on cpu (set "
            "TRITON_INTERPRET=1 before importing fastlora to run the kernels on the CPU through "
            "Triton's interpreter); or use backend='torch'") in out.stderr


def test_bench_rejects_unknown_provider(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--providers", "cublas"])
    assert e.value.code == 2 and "'cublas' is not a provider of the layer bench" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--model", "tiny", "--providers", "fastlora-fused"])
    assert e.value.code == 2 and "not a provider of the model bench" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--model", "tiny", "--shape", "1,2,3"])
    assert e.value.code == 2 and "--shape, --M and --preset are the layer bench's" in capsys.readouterr().err


def test_check_passes_on_cpu(capsys):
    assert cli.main(["check", "--device", "cpu", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "0 failure(s)" in out and "gradcheck float64" in out and "FAIL" not in out
    assert "gradcheck float64 DoRA dropout=0.4" in out and "-dora" in out and " magnitude " in out


def test_check_rows_include_qlora_and_quick_keeps_a_row_of_each_kind(capsys):
    assert cli.main(["check", "--device", "cpu", "--backend", "torch"]) == 0
    full = capsys.readouterr().out
    assert all(f"-{q}" in full for q in ("nf4bs64n", "fp4bs64", "nf4bs32n")) and "FAIL" not in full
    assert cli.main(["check", "--device", "cpu", "--backend", "torch", "--quick"]) == 0
    quick = capsys.readouterr().out
    rows = {line.split()[0] for line in quick.splitlines()[2:-1]}
    assert len(rows) < len({line.split()[0] for line in full.splitlines()[2:-1]}) / 3
    assert "0 failure(s)" in quick and quick.count("gradcheck float64") == 4
    for kind in ("-dora", "-nf4bs64n", "-p0.3", "-biasgrad"):
        assert any(kind in row for row in rows), kind


def test_check_exits_nonzero_on_a_failure_or_a_crash(monkeypatch, capsys):
    from fastlora import checks

    calls = {"n": 0}

    def flaky(case, backend, device="cpu", seed=0):
        calls["n"] += 1
        if calls["n"] == 1:
            return [Result(case.id, backend, "y", err=1.0, bound=0.5)]
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(checks, "three_way", flaky)
    assert cli.main(["check", "--device", "cpu", "--backend", "torch"]) == 1
    out = capsys.readouterr().out
    assert "FAIL RuntimeError: kernel exploded" in out
    assert any(line.split()[1:] == ["y", "1", "0.5", "FAIL"] for line in out.splitlines())


@pytest.mark.slow
def test_demo_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "fastlora", "--steps", "3"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "trainable params" in out.stdout and "step    3" in out.stdout


def test_plot(tmp_path):
    """The figure holds a panel per problem, labelled axes and one line per provider that ran."""
    pytest.importorskip("matplotlib")
    from fastlora import bench

    rows = bench.run([(16, 32, 32), (64, 32, 32), (16, 32, 48)], [4], bench.DTYPES["fp32"], ["fwd"],
                     ["base", "peft", "fastlora"], torch.device("cpu"), cpu_rounds=2)
    fig = bench.plot(str(tmp_path / "p.png"), rows)
    assert (tmp_path / "p.png").stat().st_size > 1000
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert sorted(ax.get_title() for ax in panels) == ["32->32 r=4 fp32 fwd", "32->48 r=4 fp32 fwd"]
    for ax in panels:
        assert ax.get_xlabel() == "M (rows)" and ax.get_ylabel() == "time / base F.linear"
        lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
        assert sorted(lines) == ["base", "fastlora", "peft"]
        assert list(lines["base"].get_ydata()) == [1.0] * len(lines["base"].get_xdata())
    two_m = next(ax for ax in panels if ax.get_title().startswith("32->32"))
    assert [list(line.get_xdata()) for line in two_m.get_lines() if line.get_label() == "peft"] == [[16, 64]]


def test_model_bench_runs_a_tiny_decoder_on_the_cpu(tmp_path, capsys):
    """--model tiny: every provider trains a step of the same small Llama; tokens/s and ratios."""
    pytest.importorskip("peft")
    out = tmp_path / "model.json"
    assert cli.main(["bench", "--model", "tiny", "--device", "cpu", "--layers", "1", "--tokens", "64",
                     "--seq", "32", "--rounds", "1", "--quiet", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["provider"] for r in rows] == ["floor", "peft", "fastlora", "fastlora-from-peft"]
    assert all(r["status"] == "ok" and r["tokens"] == 64 and r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["ratio_to_floor"] == 1.0 and rows[1]["speedup_over_peft"] == 1.0
    assert "fastlora-from-peft" in capsys.readouterr().out


def test_bench_dora_times_dora_against_lora_and_peft_dora(tmp_path, capsys, monkeypatch):
    """--dora: fastlora-dora and peft-dora are checked against PEFT's formula in float64 (the
    magnitude's gradient too) and timed with fastlora; x peft is against peft-dora, x lora over
    fastlora. A DoRA provider whose magnitude is off is reported wrong, not timed."""
    pytest.importorskip("peft")
    js = tmp_path / "b.json"
    assert cli.main(["bench", "--dora", "--shape", "64,32,48", "--rank", "4", "--mode", "fwd", "full",
                     "--rounds", "2", "--quiet", "--device", "cpu", "--json", str(js)]) == 0
    assert "x lora" in capsys.readouterr().out
    rows = json.loads(js.read_text())["rows"]
    assert {r["provider"] for r in rows} == {"base", "fastlora", "fastlora-dora", "peft-dora"}
    for r in rows:
        assert r["status"] == "ok" and r["max_rel_err"] < 1e-4, r
        assert (r["ratio_to_lora"] is not None) == (r["provider"] == "fastlora-dora")
    assert all(r["speedup_over_peft"] == 1.0 for r in rows if r["provider"] == "peft-dora")
    assert all(r["speedup_over_peft"] > 0 for r in rows if r["provider"] == "fastlora-dora")

    from fastlora import bench
    real_build = bench.build

    def broken(provider, w):
        module, params = real_build(provider, w)
        if provider == "fastlora-dora":
            with torch.no_grad():
                module.lora_magnitude_vector.mul_(1.01)
        return module, params

    monkeypatch.setattr(bench, "build", broken)
    assert cli.main(["bench", "--dora", "--shape", "64,32,48", "--mode", "fwd", "--rounds", "2", "--quiet",
                     "--device", "cpu", "--json", str(js)]) == 1
    row = next(r for r in json.loads(js.read_text())["rows"] if r["provider"] == "fastlora-dora")
    assert row["status"] == "wrong" and row["ms"] is None


def test_model_bench_dora_on_the_cpu(tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "model.json"
    assert cli.main(["bench", "--model", "tiny", "--dora", "--device", "cpu", "--layers", "1", "--tokens", "64",
                     "--seq", "32", "--rounds", "1", "--quiet", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["provider"] for r in rows] == ["floor", "fastlora", "fastlora-dora", "peft-dora"]
    assert all(r["status"] == "ok" for r in rows)
    dora = rows[2]
    assert dora["ratio_to_lora"] > 0 and dora["speedup_over_peft"] > 0 and rows[3]["speedup_over_peft"] == 1.0


def test_bench_over_a_4bit_base(tmp_path, capsys):
    """--base nf4: the dense floor, PEFT over bitsandbytes' Linear4bit and fastlora, all on the
    same 4-bit bytes, checked against the float64 reference on the dequantized weight."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    js = tmp_path / "b.json"
    rc = cli.main(["bench", "--base", "nf4", "--shape", "48,128,96", "--rank", "4", "--mode", "fwd", "full",
                   "--rounds", "2", "--quiet", "--device", "cpu", "--json", str(js)])
    assert rc == 0
    out = capsys.readouterr().out
    assert " base " in out.splitlines()[1] and "W MB" in out
    rows = json.loads(js.read_text())["rows"]
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, m) for p in ("base", "peft", "fastlora")
                                                         for m in ("fwd", "full")}
    assert all(r["status"] == "ok" and r["base"] == "nf4" and r["max_rel_err"] < 1e-4 for r in rows)
    dense = 96 * 128 * 4 / 2**20
    for r in rows:  # half a byte a weight plus the absmax and tables, against four bytes
        assert r["weight_mb"] == pytest.approx(dense) if r["provider"] == "base" else r["weight_mb"] < dense / 6


def test_bench_over_a_4bit_base_refuses_the_dense_only_providers(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--base", "fp4", "--providers", "base", "reference"])
    assert e.value.code == 2
    assert "'reference' does not run over a 4-bit base (--base fp4)" in capsys.readouterr().err


def test_model_bench_over_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    out = tmp_path / "model.json"
    assert cli.main(["bench", "--model", "tiny", "--base", "nf4", "--device", "cpu", "--layers", "1",
                     "--tokens", "64", "--seq", "32", "--rounds", "1", "--quiet", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["provider"] for r in rows] == ["floor", "peft", "fastlora", "fastlora-from-peft"]
    assert all(r["status"] == "ok" and r["base"] == "nf4" and r["tokens_per_s"] > 0 for r in rows)
