"""Package layout only (the metadata is in pyproject.toml).

conf/ stays at the top level of the repository (DESIGN.md) and ships inside the package as
bqat/conf, every config group folder with it, so a wheel, an sdist and `pip install git+...`
carry the configs; bqat.config.conf_dir() reads that copy, or the tree's conf/ in a clone.
"""

from setuptools import find_namespace_packages, find_packages, setup

conf = ["bqat." + name for name in find_namespace_packages(include=["conf", "conf.*"])]
setup(
    packages=[*find_packages(include=["bqat*"]), *conf],
    package_dir={"bqat.conf": "conf"},
    package_data={"bqat": ["published.yaml"], **{name: ["*.yaml"] for name in conf}},  # published.yaml: scripts/report.py
)
