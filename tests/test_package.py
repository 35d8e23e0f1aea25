"""The package's layout: public names stay where users import them, whichever subpackage holds them."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import batchnorm as bn


def test_every_exported_name_resolves():
    for name in bn.__all__:
        assert getattr(bn, name) is not None, name


@pytest.mark.parametrize("name", ["constraints", "initializers", "regularizers"])
def test_keras_helper_modules_import_by_their_old_names(name):
    module = importlib.import_module(f"batchnorm.{name}")
    assert module is getattr(bn, name) is importlib.import_module(f"batchnorm.keras.{name}")


def test_peer_error_is_exported():
    from batchnorm.distributed import PeerError

    assert "PeerError" in bn.__all__
    assert bn.PeerError is PeerError
    assert issubclass(bn.PeerError, RuntimeError)


def test_layers_live_in_their_subpackages():
    assert bn.BatchNormalization is bn.keras.BatchNormalization
    assert bn.SyncBatchNormalization is bn.keras.SyncBatchNormalization
    for name in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"):
        assert getattr(bn, name) is getattr(bn.nn, name)


def test_importing_the_library_leaves_the_tools_out():
    code = "import sys, batchnorm; print(sorted(m for m in sys.modules if m.startswith('batchnorm.tools')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_sync_layers_take_the_plain_layers_arguments():
    keras = bn.SyncBatchNormalization(2, 0.9, 1e-2, name="s", comm=None)
    assert (keras.axis, keras.momentum, keras.epsilon, keras.name, keras.fused) == (2, 0.9, 1e-2, "s", False)
    assert bn.SyncBatchNormalization.from_config(keras.get_config()).get_config() == keras.get_config()
    torch = bn.SyncBatchNorm(4, 1e-3, None, False, comm=None)
    assert (torch.num_features, torch.eps, torch.momentum, torch.affine) == (4, 1e-3, None, False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        bn.SyncBatchNormalization(foo=1)


def test_batchnorm_torch_without_torch_names_the_extra():
    # sys.modules["torch"] = None makes `import torch` fail as it does where torch is absent
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "try:\n    import batchnorm.torch\nexcept ImportError as e:\n    print(e)\nelse:\n    print('imported')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 'pip install "batchnorm[torch]"' in out
    assert out.strip() != "imported"
