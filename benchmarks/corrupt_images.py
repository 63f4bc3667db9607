"""How often corrupt JPEG / PNG frames are caught by robometer_ros.images, against PIL's lenient decoder.

    .venv/bin/python benchmarks/corrupt_images.py [--trials 300] [--seed 0]

Mutates real encoded files (a camera-like synthetic scene at 160x120 and 640x480, plus matplotlib's
grace_hopper.jpg photo when matplotlib is installed): N bytes XOR-flipped inside the entropy-coded data
(JPEG) or the IDAT data (PNG), N bytes flipped anywhere after the first two (headers included), and
truncation at a random point. Prints, per file and mutation, the share images.py rejects and the share PIL
would have decoded to an image. What is not rejected is the residual: corrupt frames that get scored.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test"))

from robometer_ros.images import ImageConversionError, compressed_to_rgb
from support.fuzz_corpus import encode, entropy_start, flip_bytes, scene


def files() -> dict[str, bytes]:
    """name -> encoded file."""
    out = {}
    for height, width in ((120, 160), (480, 640)):
        frame = scene(height, width)
        out[f"scene {width}x{height} jpeg q90"] = encode(frame, "jpeg")
        out[f"scene {width}x{height} png"] = encode(frame, "png")
    try:
        from matplotlib import cbook

        out["grace_hopper.jpg (photo)"] = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).read_bytes()
    except Exception:  # matplotlib missing or without sample data
        pass
    return out


def rejected(data: bytes) -> bool:
    try:
        compressed_to_rgb("", data)
    except ImageConversionError:
        return True
    return False


def pil_decodes(data: bytes) -> bool:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"{'file':30s} {'mutation':28s} {'rejected':>9s} {'residual':>9s} {'PIL decodes':>12s}")
    for name, data in files().items():
        mutations = {f"{n} byte(s) in coded data": (n, entropy_start(data)) for n in (1, 4, 40)}
        mutations |= {"1 byte anywhere": (1, 2), "truncated": (0, 0)}
        for label, (count, start) in mutations.items():
            caught = lenient = 0
            for _ in range(args.trials):
                if label == "truncated":
                    damaged = data[: int(rng.integers(1, len(data) - 1))]
                else:
                    damaged = flip_bytes(data, count, rng, start)
                caught += rejected(damaged)
                lenient += pil_decodes(damaged)
            n = args.trials
            print(f"{name:30s} {label:28s} {100 * caught / n:8.1f}% {100 * (n - caught) / n:8.1f}% "
                  f"{100 * lenient / n:11.1f}%")


if __name__ == "__main__":
    main()
