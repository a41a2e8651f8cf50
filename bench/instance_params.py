"""Object scores of saved probabilities for a grid of instance settings (issue 15): how `seed_threshold`
and `SEED_DEPTH` trade splits against merges, without training again.

    python bench/time_to_quality.py --datasets isbi --training_slices --save_probabilities probs
    python bench/instance_params.py probs                     # every *_prob.npy there, with its *_truth.npy

Choose settings on the training slices' files (`*_training_*`), then read the held-out ones: choosing on
the held-out slices would score the choice on the data it was made on.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from emunet.inference.params import DEFAULTS  # noqa: E402
from emunet.inference.segment import Truth, score_volume, segment_probabilities  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--seed_thresholds", default="0.5,0.8,0.9,0.95", help="0.5 = no split: the mask's components")
    parser.add_argument("--depths", default="0,0.1,0.2,0.3")
    args = parser.parse_args()
    for path in sorted(Path(args.folder).glob("*_prob.npy")):
        prob = np.load(path).astype(np.float32)
        truth = np.load(str(path).replace("_prob.npy", "_truth.npy"))
        print(f"{path.name}: {prob.shape[0]} slices", flush=True)
        for seeds in map(float, args.seed_thresholds.split(",")):
            for depth in map(float, args.depths.split(",")) if seeds > 0.5 else [0.0]:
                params = DEFAULTS.replace(threshold=0.5, seed_threshold=seeds, seed_depth=depth)
                s = score_volume(segment_probabilities(prob, params, Truth.of_labels(truth))).metrics()
                print(f"  seed_threshold {seeds:.2f} depth {depth:.2f}: object_f1 {s['object_f1']:.4f}  precision "
                      f"{s['object_precision']:.4f}  recall {s['object_recall']:.4f}  count_error {s['count_error']:.4f}  "
                      f"ARE {s['adapted_rand_error']:.4f}  VI split {s['vi_split']:.4f} merge {s['vi_merge']:.4f}",
                      flush=True)


if __name__ == "__main__":
    main()
