"""The code in README.md and docs/ runs and prints what the text next to it shows."""
import contextlib
import io
import pathlib
import re
import tempfile

import pytest

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
    """exec ``code`` as a script, with tempfile's directory in tmp_path; returns its stdout."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<markdown>", "exec"), {"__name__": "__main__"})
    return out.getvalue()


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
    assert_prints_what_is_shown(run_block(code, tmp_path, monkeypatch), shown[0])
