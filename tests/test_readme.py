"""The README's library example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_library_example_runs(capsys):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})  # noqa: S102 - our own README
    out = capsys.readouterr().out
    assert "n_reset" in out and "D_f: accuracy" in out
    assert "same selection as the one call: True" in out
    forget_after = float(re.search(r"D_f: accuracy [0-9.]+% -> ([0-9.]+)%", out).group(1))
    retain_after = float(re.search(r"D_r: accuracy [0-9.]+% -> ([0-9.]+)%", out).group(1))
    assert forget_after < 10.0 and retain_after > 90.0  # the class is forgotten, D_r kept


def test_readme_states_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
def test_readme_has_no_placeholder():
    assert "PLACEHOLDER" not in README.read_text()
