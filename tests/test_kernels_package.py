"""kernels/ is a distribution of its own (lift-fast-kernels, import lift_fast_kernels) that needs only torch
and triton, and nothing at the checkout's root is importable as a top-level `kernels` (PyPI's `kernels` is a
transformers dependency that a root folder would shadow)."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = ("ClipLoss", "SigLipLoss", "clip_loss", "siglip_loss", "fused_projection_clip_loss")
# what the trainer imports and a loss-only install must not pull in
TRAINER_MODULES = ("lift_fast", "nvidia.dali", "transformers", "webdataset", "tensorboard", "matplotlib", "kernels")


def test_import_kernels_from_the_root_is_not_ours():
    """`python -c "import kernels"` started at the root finds PyPI's package (transformers needs it), not a folder of
    the checkout; transformers' own import of it works from there too."""
    code = ("import kernels, transformers.integrations.hub_kernels as hub; "
            "print(kernels.__file__); print(list(kernels.__path__))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    file, path = out.splitlines()
    assert file != "None" and not Path(file).resolve().is_relative_to(ROOT / "kernels"), file
    assert str(ROOT / "kernels") not in path, path
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_trainer_and_package_name_one_module():
    """lift_fast.kernels is the trainer's name for lift_fast_kernels: the same module objects, ops registered once."""
    import lift_fast.kernels.clip_loss
    import lift_fast_kernels
    import lift_fast_kernels.clip_loss

    import lift_fast.kernels

    assert lift_fast.kernels.clip_loss is lift_fast_kernels.clip_loss  # the function
    assert sys.modules["lift_fast.kernels.clip_loss"] is sys.modules["lift_fast_kernels.clip_loss"]
    assert lift_fast.kernels.slab_ops is lift_fast_kernels.slab_ops
    for name in PUBLIC:
        assert getattr(lift_fast.kernels, name) is getattr(lift_fast_kernels, name)


@pytest.fixture(scope="module")
def kernels_wheel(tmp_path_factory) -> Path:
    """The wheel `pip install ./kernels` builds (no build isolation: setuptools is in the test environment)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT / "kernels")], check=True, capture_output=True, text=True)
    (wheel,) = out.glob("lift_fast_kernels-*.whl")
    return wheel


def test_wheel_depends_on_torch_and_triton_only(kernels_wheel):
    with zipfile.ZipFile(kernels_wheel) as archive:
        names = archive.namelist()
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        requires = [line.split(":", 1)[1].strip() for line in archive.read(metadata).decode().splitlines()
                    if line.startswith("Requires-Dist:")]
    assert {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip() for r in requires} == {"torch", "triton"}
    packages = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert packages == {"lift_fast_kernels"}, packages


def test_installed_alone_it_imports_and_runs_without_the_trainer(kernels_wheel, tmp_path):
    """The wheel installed into an empty folder, run by an interpreter that sees only that folder and the
    environment's site-packages without its .pth files (so neither editable install is visible): the public
    API imports, a loss and its gradient run, and nothing of the trainer or its dependencies is loaded."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(kernels_wheel)], check=True, capture_output=True, text=True)
    site = sysconfig.get_paths()["purelib"]
    code = f"""
import sys
sys.path[:0] = [{str(target)!r}, {site!r}]
import torch
from lift_fast_kernels import {", ".join(PUBLIC)}
import lift_fast_kernels
assert lift_fast_kernels.__file__.startswith({str(target)!r}), lift_fast_kernels.__file__
image = torch.nn.functional.normalize(torch.randn(7, 5, dtype=torch.float64), dim=1).requires_grad_()
text = torch.nn.functional.normalize(torch.randn(7, 5, dtype=torch.float64), dim=1)
loss = clip_loss(image, text, 10.0) + siglip_loss(image, text, 10.0, -5.0)
loss.backward()
assert torch.isfinite(loss) and image.grad.abs().sum() > 0
loaded = [name for name in {TRAINER_MODULES!r} if name in sys.modules]
assert not loaded, loaded
print("ok")
"""
    result = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "LIFT_FAST_KERNELS": "torch"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
