"""Optional dependencies stay optional: importing safekd (and its non-framework modules) imports neither
transformers nor lightning; the integration names resolve lazily."""
from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import safekd, safekd.integrations, safekd.distributed, safekd.distiller, safekd.jobs, safekd.cli
dir(safekd)
heavy = sorted(m for m in ("transformers", "lightning", "pytorch_lightning", "accelerate") if m in sys.modules)
assert not heavy, f"import safekd pulled in {heavy}"
try:
    safekd.integrations.NoSuchThing
except AttributeError as exc:
    assert "NoSuchThing" in str(exc)
else:
    raise AssertionError("unknown attribute resolved")
print("ok")
"""


def test_import_safekd_does_not_import_frameworks() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
