"""The serving side must not import torch (or transformers, which would drag it in)."""

import pkgutil
import subprocess
import sys

import backend


def test_backend_imports_without_torch(tiny_dir):
    modules = sorted(m.name for m in pkgutil.walk_packages(backend.__path__, "backend."))
    assert {"backend.runtime.blip", "backend.server.wsgi", "backend.prelabel.run"} <= set(modules)
    code = (
        "import importlib, os, sys\n"
        f"os.environ['MODEL_DIR'] = {str(tiny_dir)!r}\n"  # backend.server.wsgi loads the model
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "from PIL import Image\n"
        "from backend.runtime.blip import Blip\n"
        f"blip = Blip({str(tiny_dir)!r})\n"
        "blip.caption([Image.new('RGB', (50, 40))])\n"
        "blip.answer([Image.new('RGB', (50, 40))], [['what colour is the circle?']])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'nncf') if m in sys.modules)\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
