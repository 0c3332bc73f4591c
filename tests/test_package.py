"""The package's top level: what `import mtlens` gives, as the docs spell it."""

import subprocess
import sys


def test_subpackages_are_reachable_after_a_bare_import():
    code = (
        "import mtlens\n"
        "m = mtlens.methods.create('ew')\n"
        "assert type(m).__name__ == 'EW', type(m)\n"
        "assert callable(mtlens.train.load_config) and callable(mtlens.diagnose.SaliencyMonitor)\n"
        "assert 'methods' in dir(mtlens)\n"
        "try:\n"
        "    mtlens.nope\n"
        "except AttributeError as e:\n"
        "    assert 'nope' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_torchvision_shim_runs_only_where_torchvision_is_imported():
    """`import mtlens` (and the engine, methods, diagnostics) leave torch's op registry alone; the shim
    for a CPU torch with a CUDA torchvision runs when the model backbones (timm) are imported."""
    code = (
        "import sys\n"
        "import mtlens, mtlens.engine, mtlens.methods, mtlens.diagnose, mtlens.tasks\n"
        "mtlens.methods.create('upgrad')\n"
        "assert 'mtlens.models._torchvision_shim' not in sys.modules, 'shim ran on import mtlens'\n"
        "assert 'torchvision' not in sys.modules\n"
        "import mtlens.models\n"
        "assert 'mtlens.models._torchvision_shim' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
