# cffi's setuptools hook only reads `cffi_modules` from setup(); everything else is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["kernels/build_kernel.py:ffibuilder",
                    "kernels/build_kernel.py:testing_ffibuilder"])
