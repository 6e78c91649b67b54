"""The built wheel: the extension, the Triton kernels inside mirror_rt, no top-level triton_kernels.

An editable install lets ``import triton_kernels`` resolve from the source root, so the namespace
is checked on a really built wheel (about 20 s: scikit-build-core + CMake + the C++ core)."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                           "-w", str(out), "-q"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    wheels = list(out.glob("mirror_rt-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as z:
        return z.namelist()


@pytest.mark.slow
def test_wheel_contents(wheel_names):
    names = wheel_names
    assert any(n.startswith("mirror_rt/_C") and n.endswith(".so") for n in names), \
        f"no compiled extension mirror_rt/_C*.so in the wheel: {sorted(names)}"
    assert "mirror_rt/triton_kernels/__init__.py" in names
    assert "mirror_rt/__init__.py" in names and "mirror_rt/models/llama.py" in names
    assert "mirror_rt/decoders/speculative.py" in names
    # The embedded default's trained parts ship inside the package.
    for asset in ("exit_head_l15.safetensors", "ss_draft.safetensors", "ss_draft.1.safetensors"):
        assert f"mirror_rt/assets/{asset}" in names, f"wheel lacks mirror_rt/assets/{asset}"
    top_level = {n.split("/", 1)[0] for n in names}
    assert "triton_kernels" not in top_level, "the wheel installs a top-level triton_kernels package"
    # only our package and the wheel metadata at the top level
    assert all(t == "mirror_rt" or t.endswith((".dist-info", ".data")) for t in top_level), top_level
    # no tests, sources or build trees shipped
    assert not any(n.startswith(("tests/", "csrc/", "build/")) for n in names)
    records = [n for n in names if n.endswith(".dist-info/RECORD")]
    assert records, "wheel without a RECORD"


@pytest.mark.slow
def test_wheel_entry_point(wheel_names):
    eps = [n for n in wheel_names if n.endswith(".dist-info/entry_points.txt")]
    assert eps, "wheel declares no entry points (the mirror-rt CLI)"
