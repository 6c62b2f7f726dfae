"""Packaging for lirpa_deq.

torch is deliberately NOT pinned here: the pinned, CPU-only torch is installed by the set-up path
(``requirements.txt`` via ``make``), and users with a GPU install the torch build they need first.
auto_LiRPA 0.3 on PyPI pins torch<1.13, so it is installed with ``--no-deps`` (see README).
"""
from setuptools import find_packages, setup

setup(
    name="lirpa_deq",
    version="0.1.0",
    description="Certified robustness for Deep Equilibrium Models as an auto_LiRPA plugin",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lirpa_deq", "lirpa_deq.*"]),
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
