"""Packaging for lirpa_deq.

torch is deliberately NOT pinned here: the pinned, CPU-only torch is installed by the set-up path
(``requirements.txt`` via ``make``), and users with a GPU install the torch build they need first.
auto_LiRPA 0.3 on PyPI pins torch<1.13, so it is installed with ``--no-deps`` (see README).

The install also puts ``lirpa_deq_import_hook.pth`` at the top of site-packages (regular and
editable installs; ``pip uninstall`` removes it): it starts ``_lirpa_deq_import_hook``, which makes
``import auto_LiRPA`` before ``import lirpa_deq`` work (see that module).
"""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

IMPORT_HOOK_PTH = "lirpa_deq_import_hook.pth"


class BuildPyWithImportHook(build_py):
    """build_py that also ships the import-hook .pth file at the root of the installed tree: in
    build_lib for a wheel, in the wheel's install directory for an editable install (whose
    build_lib is thrown away)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib
        self.copy_file(IMPORT_HOOK_PTH, os.path.join(target, IMPORT_HOOK_PTH), preserve_mode=False)

setup(
    name="lirpa_deq",
    version="0.1.0",
    description="Certified robustness for Deep Equilibrium Models as an auto_LiRPA plugin",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lirpa_deq", "lirpa_deq.*"]),
    py_modules=["_lirpa_deq_import_hook"],
    cmdclass={"build_py": BuildPyWithImportHook},
    python_requires=">=3.9",
    install_requires=[
        "numpy",
        "scipy",
        "statsmodels",
        "tqdm",
        "appdirs",
        "pyyaml",
        "packaging",
        "mlxtend",
        "scikit-learn",
        "matplotlib",
    ],
    extras_require={"test": ["pytest", "hypothesis"]},
    entry_points={"console_scripts": ["lirpa-deq=lirpa_deq.cli:main"]},
)
