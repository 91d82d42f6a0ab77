"""Install GvU (`gvu`, `kernels`) and build the C++ CPU ops with CMake into the kernels package.

    pip install --no-build-isolation -e .       # editable; the library lands in kernels/_C*.so
    pip install --no-build-isolation .          # regular install
    GVU_SKIP_CPP=1 pip install ...              # no C++ ops: kernels falls back to the PyTorch reference

`--no-build-isolation` makes CMake see the torch already installed (an isolated build would fetch another one).
A failed C++ build fails the install unless GVU_SKIP_CPP=1.
"""

import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt, then copy the library to where setuptools expects the extension."""

    def run(self):
        if os.environ.get("GVU_SKIP_CPP") == "1":
            print("GVU_SKIP_CPP=1: not building the C++ ops (kernels will use the PyTorch reference)")
            for ext in self.extensions:  # a library left in build/ by an earlier build must not ship
                path = self.get_ext_fullpath(ext.name)
                if os.path.exists(path) and not self.inplace and not getattr(self, "editable_mode", False):
                    os.remove(path)
            return
        super().run()

    def build_extension(self, ext):
        build_dir = os.path.join(ROOT, "build", "cmake")
        os.makedirs(build_dir, exist_ok=True)
        cfg = ["-DCMAKE_BUILD_TYPE=Release", f"-DPython3_EXECUTABLE={sys.executable}"]
        if shutil.which("ninja"):
            cfg += ["-G", "Ninja"]
        try:
            subprocess.run(["cmake", "-S", ROOT, "-B", build_dir, *cfg], check=True)
            subprocess.run(["cmake", "--build", build_dir, "--parallel", str(os.cpu_count() or 1)], check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise RuntimeError(
                f"building the C++ ops failed ({e}); fix the error above, or set GVU_SKIP_CPP=1 to install without them"
            ) from e
        dest = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(os.path.join(build_dir, "libgvu_kernels.so"), dest)


setup(
    name="gvu",
    version="0.1.0",
    description="GvU: GRPO for unified multimodal models, with fused log-prob kernels",
    packages=find_packages(include=["gvu", "gvu.*", "kernels", "kernels.*"]),
    package_data={"gvu": ["assets/toy_umm/*"]},  # the shipped toy checkpoint, for non-editable installs too
    # The library is not a Python module; the empty-source Extension only gives setuptools its file name.
    ext_modules=[Extension("kernels._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers",
        "peft",
        "deepspeed",
        "safetensors",
        "tokenizers",
        "tensorboard",
        "pyyaml",
        "numpy",
        "pillow",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest", "ruff"],
        "triton": ["triton"],
        "flash": ["flash-attn"],
        "xomni": ["diffusers"],  # X-Omni's FLUX decoder (the pixel reward path)
        # The peers bench/kernel_ops.py measures against (versions the results were taken with).
        "bench": ["trl==1.16.0", "liger-kernel==0.8.5", "cut-cross-entropy==25.1.1"],
    },
)
