"""Build the shapes dataset (webdataset shards, train and held-out splits).

python data/make_shapes.py --out data/shapes/two --difficulty two
python data/make_shapes.py --out data/shapes/one --difficulty one --train 20000 --heldout 2000
"""

import argparse
import time

from tdd_lightning.data.shapes import DIFFICULTIES, ShapesConfig, make_shapes


def main(argv=None) -> dict:
    d = ShapesConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (train/, heldout/, info.json)")
    p.add_argument("--difficulty", choices=DIFFICULTIES, default=d.difficulty, help="one or two objects")
    p.add_argument("--size", type=int, default=d.size, help="image side in px (>= 32)")
    p.add_argument("--train", type=int, default=d.train, help="train samples")
    p.add_argument("--heldout", type=int, default=d.heldout, help="held-out samples")
    p.add_argument("--shards", type=int, default=d.shards, help="shards per split (>= workers x ranks)")
    p.add_argument("--seed", type=int, default=d.seed)
    a = p.parse_args(argv)
    start = time.time()
    cfg = ShapesConfig(a.difficulty, a.size, a.train, a.heldout, a.shards, a.seed)
    info = make_shapes(a.out, cfg)
    counts = ", ".join(f"{k} {v['samples']} in {v['shards']} shards" for k, v in info["splits"].items())
    print(f"wrote shapes ({a.difficulty}, {a.size}px) to {a.out}: {counts} ({time.time() - start:.1f} s)")
    return info


if __name__ == "__main__":
    from tdd_lightning.errors import exit_on_user_error

    exit_on_user_error(main)
