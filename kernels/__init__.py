"""Fused Triton kernels, installed as ``imontage.kernels``.

The folder sits at the repository top level so kernel authors find it next to ``imontage/``;
setup.py installs it under the imontage namespace because ``kernels`` is an unrelated PyPI
distribution, which transformers and diffusers import when it is installed.

With the repository root on ``sys.path`` (``python -m pytest`` or ``python -m ...`` run from the
root) ``import kernels`` would find this folder instead of that distribution, and diffusers'
model imports would fail. Imported under that name, this module therefore loads the installed
distribution in its own place (and is an ImportError when there is none): the name ``kernels``
never means this folder.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    _root = Path(__file__).resolve().parent.parent
    _elsewhere = [entry for entry in sys.path if Path(entry or ".").resolve() != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError("no installed 'kernels' distribution (this folder is imontage.kernels)")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_module)
