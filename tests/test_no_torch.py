"""The serving side must not import torch (or transformers, which would drag it in)."""

import subprocess
import sys


def test_backend_imports_without_torch(tiny_dir):
    code = (
        "import sys\n"
        "import backend.__main__, backend.blip, backend.generate, backend.manifest, backend.preprocess\n"
        "import backend.app, backend.images, backend.labeling, backend.predict\n"
        f"import os; os.environ['MODEL_DIR'] = {str(tiny_dir)!r}\n"
        "import backend.wsgi\n"
        "from PIL import Image\n"
        f"blip = backend.blip.Blip({str(tiny_dir)!r})\n"
        "blip.caption([Image.new('RGB', (50, 40))])\n"
        "blip.answer([Image.new('RGB', (50, 40))], [['what colour is the circle?']])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'nncf') if m in sys.modules)\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
