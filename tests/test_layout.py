"""The library's import boundary: ``adv`` and every submodule load without Ray."""

import pkgutil
import subprocess
import sys

import adv


def test_no_adv_module_imports_ray():
    # adv.__main__ is left out: running it would start the CLI
    names = [m.name for m in pkgutil.walk_packages(adv.__path__, "adv.") if m.name != "adv.__main__"]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "print(len(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(names) > 30 and proc.stdout.strip() == "0"


def test_actors_do_not_import_torchvision_to_evaluate_small_models():
    """Every Ray actor imports adv.evaluate.worker and builds models; torchvision (~2 s: torch._dynamo) is only
    for ImageNet models, so it loads on first use, not with the model registry."""
    code = ("import sys, adv.evaluate.worker, adv.models, adv.defenses, adv.attacks\n"
            "adv.models.create_model('lenet', num_classes=10, input_size=(1, 28, 28))\n"
            "print('torchvision' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"
