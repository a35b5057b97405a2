"""The documentation site builds with warnings as errors, says nothing internal, fetches nothing, and the
tutorial's job runs as documented."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
INTERNAL = re.compile(r"paper-spec|issue [0-9]|\bN2\b|CLI owner|§ ?[0-9]|\[INFERRED\]", re.IGNORECASE)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_docs_build_strict_and_render_the_api(site):
    assert (site / "index.html").is_file() and (site / "own-teachers" / "index.html").is_file()
    api = (site / "api" / "solvers" / "index.html").read_text(encoding="utf-8")
    assert "FeasibleSet" in api and "row[0]" in api  # rendered from the docstrings, not hand-written
    core = (site / "api" / "safekd" / "index.html").read_text(encoding="utf-8")
    assert "Atomic checkpoints of a <code>SafeDistiller</code>" in core and ":class:" not in core  # roles rendered


def test_no_internal_notes_in_docs_readme_or_site(site):
    sources = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in sources
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if INTERNAL.search(line)]
    assert not hits, hits
    pages = [p for p in site.rglob("*.html") if INTERNAL.search(p.read_text(encoding="utf-8"))]
    assert not pages, pages  # the API reference renders every docstring


def test_site_fetches_nothing(site):
    remote = re.compile(r'<(?:script|img)[^>]+src="https?://|<link[^>]+href="https?://[^"]+"[^>]*rel="stylesheet"'
                        r'|@import url\(["\']?https?://|fonts\.googleapis')
    pages = [p for p in site.rglob("*.html") if remote.search(p.read_text(encoding="utf-8"))]
    assert not pages, pages


def test_the_tutorials_job_trains_and_audits_a_data_file(tmp_path, monkeypatch, capsys):
    from safekd.cli import main

    monkeypatch.setattr(sys, "path", list(sys.path))
    # the hooks live next to the job file, under a module name nothing has imported yet
    shutil.copy(ROOT / "examples" / "wine_job.py", tmp_path / "my_wine_hooks.py")
    text = (ROOT / "examples" / "wine_job.yaml").read_text().replace("wine_job:", "my_wine_hooks:")
    job = yaml.safe_load(text)
    job["job"]["epochs"] = 3
    spec = tmp_path / "wine_job.yaml"
    spec.write_text(yaml.safe_dump(job))
    assert main(["train", "--spec", str(spec), "--out", str(tmp_path / "run"), "--no-progress"]) in (0, 1)
    assert str(tmp_path) not in sys.path  # searched during the command only
    import my_wine_hooks  # imported by the command

    new = my_wine_hooks.make_data(seed=1)["heldout"]
    torch.save({"inputs": new["inputs"], "labels": new["labels"]}, tmp_path / "new.pt")
    capsys.readouterr()
    code = main(["audit", "--spec", str(spec), "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"),
                 "--data", str(tmp_path / "new.pt"), "--no-progress"])
    out = capsys.readouterr().out
    assert code in (0, 1) and "flagged_fpr" in out and "cap(biased)" in out
    assert ("FAIL" in out) == (code == 1)


def test_readme_and_quickstart_pin_threads():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    snippet = readme.split("## Example", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "torch.set_num_threads(1)" in snippet
    quick = (ROOT / "examples" / "quickstart.py").read_text(encoding="utf-8")
    assert "torch.set_num_threads(1)" in quick.split("def main", 1)[1]
    assert "https://arxiv.org/abs/2601.17910" in readme


def test_gitignore_and_ci_cleanup():
    ignored = (ROOT / ".gitignore").read_text().split()
    assert {"runs/", "quickstart-report/", "site/"} <= set(ignored)
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"trap 'rm -rf \"\$venv_root\"' EXIT", ci) and shutil.which("bash")


def test_constraints_reference_examples_load(tmp_path):
    import safekd

    page = (ROOT / "docs" / "constraints.md").read_text(encoding="utf-8")
    example = page.split("```yaml", 1)[1].split("```", 1)[0]
    (tmp_path / "example.yaml").write_text(example)
    assert [c.name for c in safekd.load_spec(tmp_path / "example.yaml").constraints] == [
        "cap(jailbroken)", "unsafe_mass", "safety_order", "unsafe_rate"]
    rows = re.findall(r"^\| `(\w+)` \| `(\{kind: [^`]+\})` \|", page, flags=re.MULTILINE)
    assert len(rows) == 10  # every kind, each as a spec entry that loads
    every = example.split("constraints:", 1)[0] + "constraints:\n" + "".join(f"  - {e}\n" for _, e in rows)
    (tmp_path / "every.yaml").write_text(every)
    fns = {"my_rate": lambda logits, batch: logits.sum(), "my_rate_proxy": lambda logits, batch: logits.sum()}
    spec = safekd.load_spec(tmp_path / "every.yaml", functions=fns)
    assert [c.kind for c in spec.constraints] == [kind for kind, _ in rows]
