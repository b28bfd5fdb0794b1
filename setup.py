"""Only what pyproject.toml cannot say: ship `neolm-lm-eval.pth` at the root of site-packages.

The .pth imports `_neolm_lm_eval` (a few lines, no torch) so that `lm_eval --model neolm` finds neolm's
backend; lm-evaluation-harness 0.4.x has no plugin discovery. Works for wheels and editable installs.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "neolm-lm-eval.pth"
HERE = os.path.dirname(os.path.abspath(__file__))


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        self.copy_file(os.path.join(HERE, PTH), os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


class editable_wheel_with_pth(editable_wheel):
    # An editable wheel takes only package links from build_py; its root is the directory this hook gets
    # (setuptools >= 64 calls it once with the unpacked wheel, before building).
    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        self.copy_file(os.path.join(HERE, PTH), os.path.join(installation_dir, PTH))


setup(cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth})
