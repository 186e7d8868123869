"""The command line: argument handling, --json/--csv content, exit codes (CPU)."""
import csv
import json
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize("argv,msg", [(["bench", "--shape", "64,32"], "M,IN,OUT"),
                                      (["bench", "--shape", "0,32,32"], "M,IN,OUT"),
                                      (["bench", "--dropout", "1.5"], "--dropout")])
def test_bench_rejects_bad_arguments(argv, msg):
    with pytest.raises(SystemExit, match=msg):
        cli.main(argv)


def test_bench_rejects_unknown_provider(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--providers", "cublas"])
    assert "invalid choice" in capsys.readouterr().err


def test_check_passes_on_cpu(capsys):
    assert cli.main(["check", "--device", "cpu", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "0 failure(s)" in out and "gradcheck float64" in out and "FAIL" not in out


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


def test_demo_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "fastlora", "--steps", "3"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "trainable params" in out.stdout and "step    3" in out.stdout


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from fastlora import bench

    rows = bench.run([(16, 32, 32), (64, 32, 32)], [4], bench.DTYPES["fp32"], ["fwd"], ["base", "fastlora"],
                     __import__("torch").device("cpu"), cpu_rounds=2)
    bench.plot(str(tmp_path / "p.png"), rows)
    assert (tmp_path / "p.png").stat().st_size > 1000
