"""Package list only (everything else is in pyproject.toml): kernels/ and runtime/ are mapped under
nosa_sglang (see [tool.setuptools] package-dir), which automatic discovery cannot express."""

from setuptools import find_packages, setup

MAPPED = {"kernels": "nosa_sglang.kernels", "runtime": "nosa_sglang.runtime"}

packages = find_packages(include=["nosa_sglang", "nosa_sglang.*"])
for folder, name in MAPPED.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages)
