"""rexnet-serving: the ReXNet family (PaddleClas layout) from training to Paddle Serving."""

# libpaddle.so carries its own zlib; if the system libz is first loaded after paddle, cv2 and Pillow PNG
# coding crash (PaddlePaddle/Paddle#70538). Importing zlib here, before anything imports paddle, avoids
# it for every entry point of the package (see rexnet_serving/imageio.py).
import zlib  # noqa: F401

from . import compat  # noqa: F401,E402  (Paddle Serving 0.9.0 on Python 3.11: see that module)

__version__ = "0.1.0"
